"""What a running run's processes do now, read from its Redis (`python -m gantry status`).

Everything is read, nothing written: the heartbeat keys (each worker's `Activity`: state, detail,
since; the key's remaining TTL gives the age of its last beat, also for a bare b"1" beat), the
controller's journal snapshot (registered workers, open weight syncs, the fleet's prompts in
flight, the policy's version), the prompt streams' pending entries (prompts a replica read and
has not returned), the weight-sync check-ins that `gantry.comm.sync_status` publishes, and the
SyncWeights commands (when a sync was ordered). `gantry.watch.status_text` turns it into text.
The controller's code is not imported: its snapshot is read as JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import redis

from gantry.comm.protocol import Keys, SyncPlan
from gantry.comm.sync_status import member_names, read_check_ins
from gantry.comm.transport import PASSWORD_ENV, reach, redis_password
from gantry.run.activity import decode_heartbeat
from gantry.run.runtime import HEARTBEAT_TTL_S, RunInfo

# The consumer groups of the streams read here (rollout/worker.py, controller/plan.py): the
# roles' constants, not imported (gantry imports no role).
ROLLOUT_GROUP = "rollout"
CONTROLLER_GROUP = "controller"
# How far back the policy's command stream is searched for a sync's order.
COMMANDS_LOOKBACK = 200


class StatusError(RuntimeError):
    """Why there is no live status to show (the one line to print)."""


class RunOver(StatusError):
    """The run has ended (result.json exists)."""


@dataclass
class Process:
    role: str
    replica: str
    beat_age: float | None  # seconds since its last heartbeat; None: no heartbeat key
    activity: dict | None  # the decoded Activity snapshot; None for a bare beat or none
    registered: bool

    @property
    def name(self) -> str:
        return f"{self.role} {self.replica}"


@dataclass
class Pending:
    """A rollout replica's prompts: dispatched by the controller and not returned (`fleet`),
    and of those, read by the replica (the stream's pending entries, oldest read `oldest_s` ago)."""

    dispatched: int
    read: int
    oldest_s: float | None


@dataclass
class OpenSync:
    group: str
    version: int
    unconfirmed: list[str]  # rollout replicas that have not reported WeightsSynced
    members: list[str]  # every member's check-in name ([] when the plan is unknown)
    arrived: dict[str, float] | None  # member -> unix time; None when nobody published
    ordered_at: float | None  # unix time of the SyncWeights command


@dataclass
class RunStatus:
    run_id: str
    run_dir: str
    now: float
    algorithm: str  # "grpo" or "sft"
    max_staleness: int | None
    total_steps: int | None
    state: dict | None  # the controller's snapshot; None before its first commit
    # Since the controller last read a message of its streams (Redis' consumer idle time).
    controller_idle_s: float | None
    processes: list[Process] = field(default_factory=list)
    pending: dict[str, Pending] = field(default_factory=dict)
    syncs: list[OpenSync] = field(default_factory=list)

    def process(self, role: str, replica: str) -> Process | None:
        return next((p for p in self.processes if (p.role, p.replica) == (role, replica)), None)


def connect(url: str, run_dir: str | Path | None = None) -> redis.Redis:
    """A client of the run's Redis, or StatusError naming the URL and the likely fix. The
    password: the environment's, else the run directory's secret file (the launcher's)."""
    client, problem = reach(url, redis_password(run_dir))
    if problem is None:
        return client
    kind, detail = problem
    if kind == "refused":
        raise StatusError(
            f"the run's Redis at {url} refused the password: set {PASSWORD_ENV} as for the run "
            "(or read RUN_DIR/redis.secret, which the launcher writes)"
        )
    raise StatusError(
        f"the run's Redis at {url} is unreachable ({detail}): the run is not running, "
        "or this machine cannot reach it"
    )


def open_run(run_dir: str | Path) -> redis.Redis:
    """A client of the run's Redis; RunOver once result.json exists, StatusError when there
    is no run or its Redis cannot be reached."""
    return connect(_run_info(Path(run_dir)).redis_url, run_dir)


def _run_info(run_dir: Path) -> RunInfo:
    if not (run_dir / "run.json").is_file():
        raise StatusError(f"no run.json in {run_dir}: not a run directory made by the launcher")
    if (run_dir / "result.json").is_file():
        raise RunOver(_over_line(run_dir))
    return RunInfo.read(run_dir)


def read_status(run_dir: str | Path, client: redis.Redis) -> RunStatus:
    """The run's status now (RunOver once result.json exists)."""
    run_dir = Path(run_dir)
    info = _run_info(run_dir)
    keys = info.keys
    state = _json(client.get(keys.journal("state")))
    config = _json((run_dir / "config.json").read_bytes()) or {}
    policy = config.get("train", {}).get("train_policy", {})
    status = RunStatus(
        run_id=info.run_id,
        run_dir=str(run_dir),
        now=time.time(),
        algorithm=policy.get("type", "grpo"),
        max_staleness=policy.get("allowed_outdated_steps"),
        total_steps=config.get("train", {}).get("max_num_steps"),
        state=state,
        controller_idle_s=_consumer_idle(client, keys.events, CONTROLLER_GROUP, CONTROLLER_GROUP),
    )
    status.processes = _processes(client, keys, state)
    fleet = (state or {}).get("fleet") or {}
    for replica in sorted({p.replica for p in status.processes if p.role == "rollout"}):
        status.pending[replica] = _pending(client, keys, replica, fleet)
    status.syncs = _open_syncs(client, keys, state)
    return status


def _over_line(run_dir: Path) -> str:
    result = _json((run_dir / "result.json").read_bytes()) or {}
    facts = [f"{k} {result[k]}" for k in ("status", "steps") if k in result]
    said = f" ({', '.join(facts)})" if facts else ""
    return (
        f"the run is over: {run_dir / 'result.json'}{said}; "
        f"python -m gantry plot {run_dir} draws its metrics"
    )


def _json(raw: bytes | None) -> Any:
    return json.loads(raw) if raw else None


def _processes(client: redis.Redis, keys: Keys, state: dict | None) -> list[Process]:
    """Every process with a heartbeat key, and every registered worker (without one: its
    heartbeat expired, more than HEARTBEAT_TTL_S ago)."""
    found: dict[tuple[str, str], Process] = {}
    registered = {tuple(member) for member in (state or {}).get("registered", [])}
    prefix = keys.heartbeat("", "").rstrip(":")  # "<run prefix>heartbeat"
    for key in sorted(client.scan_iter(match=prefix + ":*", count=1000)):
        role, _, replica = key.decode()[len(prefix) + 1 :].partition(":")
        pipe = client.pipeline(transaction=False)
        value, ttl_ms = pipe.get(key).pttl(key).execute()
        if value is None:  # expired between the scan and the read
            continue
        age = HEARTBEAT_TTL_S - ttl_ms / 1000 if ttl_ms >= 0 else None
        found[(role, replica)] = Process(
            role, replica, age, decode_heartbeat(value), (role, replica) in registered
        )
    for role, replica in registered - set(found):
        found[(role, replica)] = Process(role, replica, None, None, True)
    order = {"policy": 0, "rollout": 1}
    return sorted(found.values(), key=lambda p: (order.get(p.role, 2), p.role, _natural(p)))


def _natural(process: Process) -> tuple[int, str]:
    replica = process.replica
    return (int(replica), "") if replica.isdigit() else (1 << 30, replica)


def _pending(client: redis.Redis, keys: Keys, replica: str, fleet: dict) -> Pending:
    dispatched = next(
        (len(r.get("in_flight", {})) for r in fleet.get("replicas", []) if r["name"] == replica),
        0,
    )
    try:
        entries = client.xpending_range(keys.prompts(replica), ROLLOUT_GROUP, "-", "+", 1000)
    except redis.ResponseError:  # no stream or group yet: the replica has read nothing
        entries = []
    oldest = max((e["time_since_delivered"] for e in entries), default=None)
    return Pending(dispatched, len(entries), oldest / 1000 if oldest is not None else None)


def _consumer_idle(client: redis.Redis, stream: str, group: str, consumer: str) -> float | None:
    try:
        consumers = client.xinfo_consumers(stream, group)
    except redis.ResponseError:
        return None
    for entry in consumers:
        name = entry["name"].decode() if isinstance(entry["name"], bytes) else entry["name"]
        if name == consumer:
            return entry["idle"] / 1000
    return None


def _open_syncs(client: redis.Redis, keys: Keys, state: dict | None) -> list[OpenSync]:
    open_syncs = (state or {}).get("open_syncs", [])
    if not open_syncs:
        return []
    plans = {
        plan["group"]: SyncPlan.model_validate(plan)
        for _members, plan in ((state or {}).get("fleet") or {}).get("plans", [])
    }
    manifest = _json(client.get(keys.manifest)) or {}
    senders = manifest.get("senders", 1) if isinstance(manifest, dict) else 1
    ordered = _sync_orders(client, keys)
    syncs = []
    for group, version, unconfirmed in sorted(open_syncs, key=lambda s: s[1]):
        plan = plans.get(group)
        published = read_check_ins(client, keys, version)
        syncs.append(
            OpenSync(
                group=group,
                version=version,
                unconfirmed=sorted(unconfirmed),
                members=member_names(plan, senders) if plan is not None else [],
                arrived=published["arrived"] if published else None,
                ordered_at=ordered.get((group, version)),
            )
        )
    return syncs


def _sync_orders(client: redis.Redis, keys: Keys) -> dict[tuple[str, int], float]:
    """(group, version) -> unix time of its SyncWeights, from the policy's recent commands."""
    found = {}
    for entry_id, fields in client.xrevrange(keys.policy_commands, count=COMMANDS_LOOKBACK):
        # Unpacked, not decoded into the message models: only a SyncWeights' plain fields are
        # needed, and a command of a newer kind must not stop the status.
        message = msgpack.unpackb(fields[b"m"], raw=False)
        if message.get("type") == "sync_weights":
            millis = int(entry_id.decode().split("-")[0])  # an entry id is its time in ms
            found.setdefault((message["plan"]["group"], message["version"]), millis / 1000)
    return found
