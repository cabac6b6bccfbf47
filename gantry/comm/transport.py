"""The control plane: messages over Redis streams, heartbeats as keys with a TTL.

Work (prompts to rollout replicas, rollouts to the controller) goes through streams read by
consumer groups: an entry stays pending until its consumer acknowledges it, so the work of a
consumer that dies is claimed by another (`claim_stale`) instead of being lost. A consumer
publishes its result and acknowledges its input in one MULTI/EXEC transaction, so a crash
never leaves a result without its acknowledgement or the reverse.
Commands to one worker go through that worker's own stream, read in order with XREAD (the
policy's, which every rank reads) or with a consumer group (a rollout replica's: one blocking
XREADGROUP waits on its prompts and its commands together, so an order wakes it at once).

Nothing on the path of a message polls: every reader blocks on its streams and wakes when an
entry lands; the block times are safety nets only. A stream entry's id is the Redis server's
clock in milliseconds when it was added: `latency_ms` is a message's time from its send to its
handling, on one clock for all senders (the handler's clock against the server's: on one node
the same one).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from gantry.comm.protocol import decode, encode

# redis-py defaults to a 5 s socket timeout, which breaks blocking reads: the blocking
# client has none, and every blocking call passes its own bounded BLOCK time instead.
_CONNECT_TIMEOUT_S = 10
# A command that meets a closed connection (the run's redis-server died and the launcher is
# starting it again from its append-only file, gantry.launch.redis_server) is sent again after
# 0.05, 0.1, 0.2, ... 1 s: for about RECONNECT_WINDOW_S (36 s) in all, then redis.ConnectionError is
# raised. A MULTI/EXEC transaction is sent again whole.
RECONNECT_BACKOFF = dict(base=0.05, cap=1.0)
RECONNECT_RETRIES = 40
LAUNCHER_RETRIES = 5  # 1.5 s: a Redis restart takes well under; a dead one is its watch's
RECONNECT_WINDOW_S = sum(
    min(RECONNECT_BACKOFF["cap"], RECONNECT_BACKOFF["base"] * 2**i)
    for i in range(RECONNECT_RETRIES)
)


class _Reconnect(Retry):
    """redis-py's Retry on ConnectionError, except a refused password (an AuthenticationError
    is one): that will not change by trying again."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def reconnecting(retries: int = RECONNECT_RETRIES) -> Retry:
    """The retry of the run's clients on a lost connection (not on a timeout: a command that
    timed out may have been carried out, and a hung server is not one being restarted)."""
    return _Reconnect(ExponentialBackoff(**RECONNECT_BACKOFF), retries, (redis.ConnectionError,))


@dataclass(frozen=True)
class Delivery:
    stream: str
    entry_id: str
    message: Any

    def latency_ms(self) -> float:
        return latency_ms(self.entry_id)


def sent_ms(entry_id: str) -> int:
    """When a stream entry was added: its id's first part, the server's clock in ms."""
    return int(entry_id.partition("-")[0])


def latency_ms(entry_id: str, now_s: float | None = None) -> float:
    """Milliseconds from the entry's send to now (never below 0: the id has ms resolution,
    and another node's clock may run behind the server's)."""
    now = time.time() if now_s is None else now_s
    return max(0.0, now * 1000.0 - sent_ms(entry_id))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latencies:
    """Send-to-handle latencies a process measured since they were last taken (per step)."""

    values: list[float] = field(default_factory=list)

    def handled(self, entry_id: str) -> None:
        self.values.append(round(latency_ms(entry_id), 3))

    def take(self) -> list[float]:
        values, self.values = self.values, []
        return values


PASSWORD_ENV = "GANTRY_REDIS_PASSWORD"


# The launcher keeps the run's password in RUN_DIR/redis.secret (mode 0600), for the commands
# a user runs from another shell (`python -m gantry status RUN_DIR`); the run's own processes
# get it in their environment only.
SECRET_FILE = "redis.secret"


def redis_password(run_dir: str | os.PathLike | None = None) -> str | None:
    """The run's Redis password: from the environment, else (given the run directory) from its
    secret file; never from a URL, which is written to run.json and logs."""
    password = os.environ.get(PASSWORD_ENV)
    if password or run_dir is None:
        return password or None
    try:
        return (Path(run_dir) / SECRET_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def reach(
    url: str, password: str | None, *, timeout_s: float = 5.0
) -> tuple[redis.Redis, tuple[str, str] | None]:
    """A client of the Redis at `url`, and why it cannot be used: ("refused", detail) when the
    server refuses the password (or its absence), ("unreachable", detail) when it cannot be
    reached, None when it answers."""
    client = redis.Redis.from_url(
        url,
        password=password,
        protocol=2,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
    )
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return client, ("refused", str(exc))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return client, ("unreachable", str(exc))
    return client, None


class ControlPlane:
    """`retries`: how often a command is sent again on a lost connection (see RECONNECT_*); the
    launcher's own, which must not hold its supervision loop, takes fewer."""

    def __init__(self, url: str, *, retries: int = RECONNECT_RETRIES) -> None:
        self.url = url
        # RESP2 pinned: the reply shapes parsed below differ under RESP3.
        common = dict(
            protocol=2,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            password=redis_password(),
            retry=reconnecting(retries),
        )
        self.redis = redis.Redis.from_url(url, socket_timeout=30, **common)
        self._blocking = redis.Redis.from_url(url, socket_timeout=None, **common)
        self._cursors: dict[str, str] = {}

    def close(self) -> None:
        self.redis.close()
        self._blocking.close()

    # ---- streams --------------------------------------------------------------------

    def send(self, stream: str, message: Any) -> str:
        return self.redis.xadd(stream, entry_fields(message)).decode()

    def send_many(self, stream: str, messages: list[Any]) -> None:
        """Append all of `messages` at once: a reader blocked on the stream wakes to all of
        them (not pipelined one by one, which would wake it after the first)."""
        pipe = self.redis.pipeline(transaction=True)
        for message in messages:
            pipe.xadd(stream, entry_fields(message))
        pipe.execute()

    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (and the stream) if missing, reading from the start."""
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_group(
        self, streams: list[str], group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        """New entries for this consumer; they stay pending until acknowledged."""
        reply = self._blocking.xreadgroup(
            group, consumer, {s: ">" for s in streams}, count=count, block=block_ms
        )
        return _deliveries(reply)

    def read_own_pending(
        self, stream: str, group: str, consumer: str, count: int, after: str = "0"
    ) -> list[Delivery]:
        """Entries delivered to this consumer name before and never acknowledged (restart),
        the first `count` after the entry id `after`."""
        reply = self.redis.xreadgroup(group, consumer, {stream: after}, count=count)
        return _deliveries(reply)

    def read_all_pending(self, stream: str, group: str, consumer: str) -> list[Delivery]:
        """Every entry of `stream` delivered to this consumer and never acknowledged."""
        found: list[Delivery] = []
        while page := self.read_own_pending(
            stream, group, consumer, 1000, after=found[-1].entry_id if found else "0"
        ):
            found += page
        return found

    def claim_stale(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Delivery]:
        """Take over entries another consumer has held unacknowledged for `min_idle_ms`."""
        _next, entries, *_ = self.redis.xautoclaim(
            stream, group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
        )
        return [
            Delivery(stream, entry_id.decode(), decode(fields[b"m"]))
            for entry_id, fields in entries
            if fields  # an entry deleted from the stream comes back without fields
        ]

    def ack(self, stream: str, group: str, entry_ids: list[str]) -> None:
        if entry_ids:
            self.redis.xack(stream, group, *entry_ids)

    def ack_and_send(
        self, stream: str, group: str, entry_ids: list[str], out_stream: str, messages: list[Any]
    ) -> None:
        """Publish results and acknowledge the inputs they came from, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        for message in messages:
            pipe.xadd(out_stream, entry_fields(message))
        if entry_ids:
            pipe.xack(stream, group, *entry_ids)
        pipe.execute()

    def read_next(self, stream: str, block_ms: int | None, count: int = 16) -> list[Any]:
        """The next messages of a single-reader stream (a worker's commands), in order."""
        return [d.message for d in self.read_commands(stream, block_ms, count)]

    def read_commands(self, stream: str, block_ms: int | None, count: int = 16) -> list[Delivery]:
        """`read_next` with the entries' ids (their send times: `Delivery.latency_ms`)."""
        cursor = self._cursors.get(stream, "0")
        client = self._blocking if block_ms is not None else self.redis
        reply = client.xread({stream: cursor}, count=count, block=block_ms)
        deliveries = _deliveries(reply)
        if deliveries:
            self._cursors[stream] = deliveries[-1].entry_id
        return deliveries

    # ---- keys -----------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` (a run's, before it starts again); how many."""
        keys = list(self.redis.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            self.redis.unlink(*keys[i : i + 1000])
        return len(keys)

    def beat(self, key: str, ttl_s: float, value: bytes = b"1") -> None:
        """Refresh a heartbeat key; its value says what the process does (gantry.run.activity)."""
        self.redis.set(key, value, px=int(ttl_s * 1000))

    def alive(self, key: str) -> bool:
        return bool(self.redis.exists(key))


def entry_fields(message: Any) -> dict[str, bytes]:
    """A message as the fields of a stream entry."""
    return {"m": encode(message)}


def _deliveries(reply: Any) -> list[Delivery]:
    out: list[Delivery] = []
    for stream, entries in reply or []:  # RESP2 shape: [[stream, [(id, fields), ...]], ...]
        name = stream.decode()
        for entry_id, fields in entries:
            if fields:
                out.append(Delivery(name, entry_id.decode(), decode(fields[b"m"])))
    return out
