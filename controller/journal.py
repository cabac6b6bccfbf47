"""The controller's run state in Redis, so that a restarted controller carries on where the one
before it stopped while the workers keep running.

Every pass of the controller's loop is one MULTI/EXEC transaction (`Outbox.commit`): the
messages it sent, the entries it acknowledged, the keys it set, the records it appended and a
snapshot of its state land together or not at all. A controller killed mid-pass leaves nothing
of that pass behind: the entries it had read are still pending in its consumer group, and the
next controller, starting from the last snapshot, reads them again (`pending_deliveries`) and
handles them as if for the first time. So a prompt is never handed out twice by a restart, a
batch never sent twice, a result never lost.

What grows with the run (per-step records, the prompts already trained) is appended to Redis
lists and sets in the same transaction instead of being rewritten in every snapshot; files that
mirror a list (`metrics.jsonl`, `samples.jsonl`) are brought up to date after each commit and
after a restart. They hold committed records only: the trackers (controller.trackers) follow them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gantry.comm.protocol import Keys
from gantry.comm.transport import ControlPlane, Delivery, entry_fields
from gantry.run.checkpoints import append_whole, trim_partial_line


class Outbox:
    """The controller's writes of one pass, applied at `commit` with its state snapshot."""

    def __init__(self, plane: ControlPlane, keys: Keys) -> None:
        self.plane, self.keys = plane, keys
        self._pipe = plane.redis.pipeline(transaction=True)
        self._mirrors: dict[str, Path] = {}
        self._appended: dict[str, list[bytes]] = {}
        self._committed = ""

    # ---- the writes of a pass ------------------------------------------------------------

    def send(self, stream: str, message: Any) -> None:
        self._pipe.xadd(stream, entry_fields(message))

    def send_many(self, stream: str, messages: list[Any]) -> None:
        for message in messages:  # one EXEC: a blocked reader wakes to all of them
            self.send(stream, message)

    def ack(self, stream: str, group: str, entry_ids: list[str]) -> None:
        if entry_ids:
            self._pipe.xack(stream, group, *entry_ids)

    def set(self, key: str, value: bytes, ex: int) -> None:
        self._pipe.set(key, value, ex=ex)

    def delete(self, key: str) -> None:
        self._pipe.delete(key)

    def append(self, name: str, record: Any) -> None:
        """Add `record` (JSON) to the journal list `name`."""
        line = json.dumps(record).encode()
        self._pipe.rpush(self.keys.journal(name), line)
        self._appended.setdefault(name, []).append(line)

    def mark(self, name: str, member: str, present: bool = True) -> None:
        """Add `member` to the journal set `name` (or remove it)."""
        key = self.keys.journal(name)
        if present:
            self._pipe.sadd(key, member)
        else:
            self._pipe.srem(key, member)

    def mirror(self, name: str, path: Path) -> None:
        """Append what the journal list `name` gets to the file `path` (JSON lines), after
        each commit; `catch_up_mirror` repairs a file that a crash left behind."""
        self._mirrors[name] = path

    # ---- committing ------------------------------------------------------------------------

    def commit(self, state: dict) -> None:
        """Apply the pass's writes and store `state`, atomically (nothing to do for a pass that
        wrote nothing and changed nothing)."""
        snapshot = json.dumps(state)
        if snapshot == self._committed and not len(self._pipe):
            return
        self._pipe.set(self.keys.journal("state"), snapshot)
        self._pipe.execute()  # a fresh MULTI starts with the next write
        self._committed = snapshot
        appended, self._appended = self._appended, {}
        for name, lines in appended.items():
            if name in self._mirrors:
                _append_lines(self._mirrors[name], lines)

    def discard(self) -> None:
        """Forget the pass's writes (tests: a controller that died before committing)."""
        self._pipe.reset()
        self._appended = {}


def load_state(plane: ControlPlane, keys: Keys) -> dict | None:
    """The last committed snapshot of this run's controller, None before the first commit."""
    raw = plane.redis.get(keys.journal("state"))
    return json.loads(raw) if raw is not None else None


def load_list(plane: ControlPlane, keys: Keys, name: str) -> list:
    return [json.loads(item) for item in plane.redis.lrange(keys.journal(name), 0, -1)]


def load_set(plane: ControlPlane, keys: Keys, name: str) -> set[str]:
    return {member.decode() for member in plane.redis.smembers(keys.journal(name))}


def lines_in(path: Path) -> int:
    """The whole lines of `path` (a partial last line is not one)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def catch_up_mirror(plane: ControlPlane, keys: Keys, name: str, path: Path, base: int) -> None:
    """Append the records of the list `name` that `path` lacks: the file held `base` lines
    (an earlier attempt's) when the list was empty. A partial last line (a writer killed in
    the middle of one) is cut off first: the record it began is written again whole."""
    trim_partial_line(path)
    have = lines_in(path) - base
    missing = plane.redis.lrange(keys.journal(name), max(have, 0), -1)
    if missing:
        _append_lines(path, missing)


def _append_lines(path: Path, lines: list[bytes]) -> None:
    """All of `lines` or none (gantry.run.checkpoints.append_whole): on a full disk the file
    keeps its whole lines and DiskFullError names it; the records stay in the journal."""
    append_whole(path, b"".join(line + b"\n" for line in lines))


def pending_deliveries(
    plane: ControlPlane, streams: list[str], group: str, consumer: str
) -> list[Delivery]:
    """Every entry delivered to `consumer` and not acknowledged, across `streams`, in the order
    they were added (to the millisecond across streams: an id is a time and a per-stream count)."""
    found: list[Delivery] = []
    for stream in streams:
        found += plane.read_all_pending(stream, group, consumer)
    return sorted(found, key=lambda d: tuple(int(part) for part in d.entry_id.split("-")))
