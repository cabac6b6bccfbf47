"""The controller's state: one typed structure, and one way to and from JSON for it.

Everything of the controller that outlives its process is a field of `ControllerState`. Two
places store one: the journal's snapshot (controller.journal, after every pass of the loop, read
back by a restarted controller) and a checkpoint's controller.json (read back by a run resumed
from that checkpoint). Both are `state_to_json` of a state and both come back through
`state_from_json`. A checkpoint holds `carried(...)`: the part a resumed run carries on with
(steps, dataset position, per-step history); the rest starts afresh in a new run.

What grows with the run (`JOURNALED`: a value per step) is appended to the journal's lists in
the pass that adds it, so a snapshot leaves those fields out and a restarted controller reads
them back from the lists; a checkpoint keeps them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from controller.scheduler import BufferStats

# Fields kept in the journal's lists of the same name, not in its snapshots.
JOURNALED = ("rewards", "tokens_per_s", "validations")


@dataclass
class RolloutBatch:
    """A GRPO batch in flight: what the step's metrics record needs from when it was sent."""

    sent: float  # time.monotonic() when sent
    reward_mean: float
    samples: int  # completions in the batch
    staleness: list[int]  # per group: policy version at sending - version that generated it
    prompt_ids: list[str]  # what the step trains on: an audit trail in metrics.jsonl
    # The rollout-side metrics of the step (controller.grpo_metrics.rollout_metrics).
    metrics: dict = field(default_factory=dict)


@dataclass
class DatasetBatch:
    """An SFT batch in flight."""

    sent: float  # time.monotonic() when sent
    epoch: int  # of its last sample


InFlightBatch = RolloutBatch | DatasetBatch
_BATCH_KINDS: dict[str, type] = {"rollouts": RolloutBatch, "dataset": DatasetBatch}


@dataclass
class ControllerState:
    """The controller's run state. The parts its components keep (`queue`, `fleet`, the
    buffer's `buffered` and `buffer_stats`) are their own JSON forms, captured from them
    before the state is stored and handed back to them when it is read."""

    # ---- what a checkpoint carries into a resumed run
    run_id: str = ""
    version: int = 0  # the policy's weights: steps done
    steps_sent: int = 0
    queue: dict = field(default_factory=dict)  # PromptQueue.state(): the dataset position
    buffer_stats: BufferStats = field(default_factory=BufferStats)
    rewards: list[float] = field(default_factory=list)  # per step; SFT: the loss
    truncated_samples: int = 0  # SFT: conversations cut at policy.model_max_length
    # ---- what only a restarted controller needs
    in_flight: InFlightBatch | None = None  # the batch the policy is training on
    registered: set[tuple[str, str]] = field(default_factory=set)  # (role, replica)
    # Syncs ordered and not yet confirmed by every replica: (group, version) -> replicas.
    open_syncs: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    fleet_empty_since: float | None = None
    uploads: list[dict] = field(default_factory=list)
    # Saves ordered and not on disk yet: the controller's part of each (controller.json).
    checkpoints: dict[int, ControllerState] = field(default_factory=dict)
    finished: bool = False
    final_export: str = ""
    last_step_done: float | None = None
    started_at: float = 0.0  # time.monotonic: a restart runs on the same node
    started: bool = False  # every worker registered, training began
    controller_restarts: int = 0
    metrics_base: int = 0  # records of an earlier attempt in metrics.jsonl
    samples_base: int = 0  # records of an earlier attempt in samples.jsonl
    buffered: list[str] = field(default_factory=list)  # RolloutBuffer.entry_ids()
    fleet: dict = field(default_factory=dict)  # RolloutFleet.state()
    tokens_per_s: list[float] = field(default_factory=list)  # SFT, per step
    validations: list[dict] = field(default_factory=list)  # SFT: validation records


def carried(state: ControllerState, step: int, queue: dict) -> ControllerState:
    """The state a run resumed from the checkpoint of `step` starts from; `queue` is the
    queue's state with the prompts not trained yet put back in front."""
    return ControllerState(
        run_id=state.run_id,
        version=step,
        steps_sent=step,
        queue=queue,
        buffer_stats=BufferStats(**asdict(state.buffer_stats)),
        rewards=list(state.rewards),
        truncated_samples=state.truncated_samples,
    )


def state_to_json(state: ControllerState, *, journaled: bool = True) -> dict[str, Any]:
    """`state` as JSON-able values; without the `JOURNALED` lists unless `journaled`."""
    data = {
        "run_id": state.run_id,
        "version": state.version,
        "steps_sent": state.steps_sent,
        "queue": state.queue,
        "buffer_stats": asdict(state.buffer_stats),
        "truncated_samples": state.truncated_samples,
        "in_flight": _batch_to_json(state.in_flight),
        "registered": [list(member) for member in sorted(state.registered)],
        "open_syncs": [[g, v, sorted(w)] for (g, v), w in state.open_syncs.items()],
        "fleet_empty_since": state.fleet_empty_since,
        "uploads": state.uploads,
        "checkpoints": {str(k): state_to_json(v) for k, v in state.checkpoints.items()},
        "finished": state.finished,
        "final_export": state.final_export,
        "last_step_done": state.last_step_done,
        "started_at": state.started_at,
        "started": state.started,
        "controller_restarts": state.controller_restarts,
        "metrics_base": state.metrics_base,
        "samples_base": state.samples_base,
        "buffered": state.buffered,
        "fleet": state.fleet,
    }
    if journaled:
        data.update({name: getattr(state, name) for name in JOURNALED})
    return data


def state_from_json(data: dict[str, Any]) -> ControllerState:
    """The state `state_to_json` wrote; fields it left out (the journaled lists) are empty.
    Unknown keys are refused: the file or snapshot is not a controller state of this code."""
    values = dict(data)
    known = set(ControllerState.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"not a controller state: unknown field(s) {unknown}")
    if "buffer_stats" in values:
        values["buffer_stats"] = BufferStats(**values["buffer_stats"])
    if "in_flight" in values:
        values["in_flight"] = _batch_from_json(values["in_flight"])
    if "registered" in values:
        values["registered"] = {tuple(member) for member in values["registered"]}
    if "open_syncs" in values:
        values["open_syncs"] = {(g, v): set(w) for g, v, w in values["open_syncs"]}
    if "checkpoints" in values:
        values["checkpoints"] = {
            int(k): state_from_json(v) for k, v in values["checkpoints"].items()
        }
    return ControllerState(**values)


def _batch_to_json(batch: InFlightBatch | None) -> dict | None:
    if batch is None:
        return None
    kind = next(k for k, cls in _BATCH_KINDS.items() if isinstance(batch, cls))
    return {"kind": kind, **asdict(batch)}


def _batch_from_json(data: dict | None) -> InFlightBatch | None:
    if data is None:
        return None
    fields = dict(data)
    return _BATCH_KINDS[fields.pop("kind")](**fields)
