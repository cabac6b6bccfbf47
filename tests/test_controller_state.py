"""The controller's state: one structure, one JSON form, the same progress whether a controller
comes back from its journal's snapshot (a restart) or a new run from a checkpoint (a resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller import journal
from controller.controller import GROUP, Controller
from controller.scheduler import BufferStats
from controller.state import (
    JOURNALED,
    ControllerState,
    DatasetBatch,
    RolloutBatch,
    carried,
    state_from_json,
    state_to_json,
)
from gantry.comm.protocol import CheckpointSaved
from gantry.config import load_config
from gantry.run.runtime import RunInfo

ROOT = Path(__file__).resolve().parents[1]


def full_state() -> ControllerState:
    """A state with every field away from its default."""
    return ControllerState(
        run_id="run",
        version=7,
        steps_sent=8,
        queue={"epoch": 1, "position": 12, "retry": ["0:3"]},
        buffer_stats=BufferStats(accepted=30, dropped_stale=2, duplicates=1),
        rewards=[0.1, 0.5],
        truncated_samples=3,
        in_flight=RolloutBatch(
            sent=12.5, reward_mean=0.25, samples=16, staleness=[0, 1], prompt_ids=["0:1", "0:2"]
        ),
        registered={("policy", "0"), ("rollout", "1")},
        open_syncs={("run/plan1", 7): {"0", "1"}},
        fleet_empty_since=3.5,
        uploads=[{"name": "final", "destination": "s3://b", "ok": True, "error": ""}],
        checkpoints={6: ControllerState(run_id="run", version=6, steps_sent=6, rewards=[0.1])},
        finished=True,
        final_export="/run/export/final",
        last_step_done=11.0,
        started_at=1.0,
        started=True,
        controller_restarts=2,
        metrics_base=4,
        buffered=["5-0", "6-0"],
        fleet={"port": 1234, "replicas": [], "departed": [], "plans": [], "serial": 1},
        tokens_per_s=[1000.0],
        validations=[{"step": 5, "val_loss": 1.0}],
    )


def through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


def test_a_state_comes_back_from_its_json_whole():
    state = full_state()
    assert state_from_json(through_json(state_to_json(state))) == state
    sft = ControllerState(in_flight=DatasetBatch(sent=2.0, epoch=1))
    assert state_from_json(through_json(state_to_json(sft))) == sft


def test_a_snapshot_leaves_the_journaled_lists_out():
    state = full_state()
    snapshot = through_json(state_to_json(state, journaled=False))
    assert not set(JOURNALED) & set(snapshot)
    back = state_from_json(snapshot)
    assert all(getattr(back, name) == [] for name in JOURNALED)
    assert back.checkpoints[6].rewards == [0.1]  # a checkpoint's part keeps them
    for name in JOURNALED:
        setattr(back, name, getattr(state, name))
    assert back == state


def test_a_field_this_code_does_not_know_is_refused():
    with pytest.raises(ValueError, match="unknown field.*'step'"):
        state_from_json({"step": 3, "version": 3})


def controller_of(kind: str, redis_url: str, run_dir: Path, resume_from: str = "") -> Controller:
    run_dir.mkdir(exist_ok=True)
    config = load_config(ROOT / f"configs/quickstart-{kind}.toml", [])
    info = RunInfo(
        run_id="run", run_dir=str(run_dir), redis_url=redis_url, dataset_script="",
        dataset_size=64, model_path="", resume_from=resume_from,
    )  # fmt: skip
    controller = Controller(config, info)
    for stream in (info.keys.rollouts, info.keys.events):
        controller.context.plane.ensure_group(stream, GROUP)
    return controller


def progress(controller: Controller) -> ControllerState:
    """What a checkpoint of the controller's current step would carry."""
    state = controller.state
    controller.plan.capture(state)
    return carried(state, state.version, controller.context.queue.state())


@pytest.mark.redis
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_a_restart_and_a_resume_carry_on_from_the_same_state(kind, redis_url, tmp_path):
    first = controller_of(kind, redis_url, tmp_path / "first")
    run, state = first.context, first.state
    for _ in range(10):  # ten samples trained
        run.queue.next()
    state.version = state.steps_sent = 5
    for value in (0.1, 0.2, 0.3, 0.4, 0.5):
        run.remember("rewards", value)
    state.truncated_samples = 4
    state.buffer_stats.dropped_stale, state.buffer_stats.duplicates = 3, 2
    if kind == "grpo":  # the buffer keeps the live counters
        first.plan.buffer.stats = state.buffer_stats
    first._order_checkpoint(5)
    checkpoint = tmp_path / "first" / "checkpoints" / "step_5"
    checkpoint.mkdir(parents=True)
    first._on_checkpoint_saved(CheckpointSaved(step=5, path=str(checkpoint), seconds=0.1))
    first._commit()
    expected = progress(first)

    restarted = controller_of(kind, redis_url, tmp_path / "first")
    restarted._recover(journal.load_state(restarted.context.plane, restarted.context.keys))
    assert restarted.state.controller_restarts == 1
    resumed = controller_of(kind, redis_url, tmp_path / "second", resume_from=str(checkpoint))
    resumed._resume(checkpoint)

    assert progress(restarted) == progress(resumed) == expected
    assert expected.rewards == [0.1, 0.2, 0.3, 0.4, 0.5] and expected.truncated_samples == 4
    assert expected.buffer_stats.dropped_stale == 3 and expected.buffer_stats.duplicates == 2
    ahead = [[c.context.queue.next() for _ in range(5)] for c in (first, restarted, resumed)]
    assert ahead[0] == ahead[1] == ahead[2]
