"""The metrics: one definition (gantry.comm.metrics) that every record key and docs/metrics.md
follow; each GRPO rollout metric of a hand-made batch equals its value computed by hand; a
rollout worker measures what only it can (texts, each reward function, its seconds and idle
time); the controller writes a step's record and its sample completions."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from controller import grpo_metrics, journal
from controller.controller import GROUP, Controller
from gantry.comm import metrics as defs
from gantry.comm.protocol import (
    GRPOStepMetrics,
    PromptTask,
    RolloutGroup,
    Sample,
    StepDone,
    TrainBatch,
)
from gantry.comm.transport import ControlPlane
from gantry.config import load_config
from gantry.run.runtime import RunInfo

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["correct", "format"]


def sample(parts: tuple[float, float], length: int, finish: str = "stop") -> Sample:
    return Sample(
        token_ids=list(range(length)), logprobs=[-1.0] * length, reward=sum(parts),
        finish_reason=finish, reward_parts=list(parts), text=f"{length} tokens",
    )  # fmt: skip


def group(index: int, version: int, samples: list[Sample], seconds: float = 0.0) -> RolloutGroup:
    return RolloutGroup(
        prompt_id=f"0:{index}", replica="0", policy_version=version, prompt_token_ids=[1, 2],
        samples=samples, reward_names=NAMES, prompt_text=f"prompt {index}",
        generation_seconds=seconds, scoring_seconds=seconds / 10,
        idle_seconds=seconds / 2, busy_seconds=seconds,
    )  # fmt: skip


def hand_made_batch() -> list[RolloutGroup]:
    """Three groups of four: mixed rewards, all equal, and all cut at the length limit."""
    return [
        group(0, 1, [sample((1, 0.5), 3), sample((0, 0.5), 4, "length"),
                     sample((0, 0), 4, "length"), sample((1, 0.5), 2)], seconds=1.0),
        group(1, 0, [sample((0, 0.5), 1) for _ in range(4)], seconds=2.0),
        group(2, 1, [sample((1, 0), 4, "length"), sample((1, 0.5), 4, "length"),
                     sample((0, 0.5), 4, "length"), sample((0, 0), 4, "length")], seconds=4.0),
    ]  # fmt: skip


STALENESS = [0, 1, 0]  # the controller at version 1: groups of versions 1, 0, 1


def test_each_rollout_metric_of_a_hand_made_batch():
    got = grpo_metrics.rollout_metrics(hand_made_batch(), STALENESS, max_staleness=2)
    rewards = [1.5, 0.5, 0, 1.5] + [0.5] * 4 + [1, 1.5, 0.5, 0]
    mean = 8.5 / 12
    assert got["reward_mean"] == pytest.approx(mean)
    assert got["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 12))
    assert (got["reward_min"], got["reward_max"]) == (0, 1.5)
    assert got["reward/correct"] == pytest.approx(4 / 12)  # 1,0,0,1 | 0 x4 | 1,1,0,0
    assert got["reward/format"] == pytest.approx(4.5 / 12)  # 1.5 | 2.0 | 1.0
    # within-group unbiased std: group 0 sqrt(1.6875 / 3) = 0.75, group 1 0, group 2 sqrt(1.25/3)
    assert got["reward_group_std_mean"] == pytest.approx((0.75 + 0 + math.sqrt(1.25 / 3)) / 3)
    assert got["groups_all_equal_fraction"] == pytest.approx(1 / 3)
    assert got["completion_len_mean"] == pytest.approx(33 / 12)
    assert got["completion_len_max"] == 4
    assert got["truncated_fraction"] == pytest.approx(6 / 12)
    assert got["staleness_mean"] == pytest.approx(1 / 3) and got["staleness_max"] == 1
    assert got["staleness_hist"] == [2, 1, 0]
    assert got["generation_seconds"] == pytest.approx(7.0)
    assert got["scoring_seconds"] == pytest.approx(0.7)
    assert defs.undefined_keys(got) == []


def test_staleness_histogram_counts_each_value_and_keeps_its_length():
    assert grpo_metrics.staleness_histogram([0, 0, 2], 2) == [2, 0, 1]
    assert grpo_metrics.staleness_histogram([0, 0], 3) == [2, 0, 0, 0]
    assert grpo_metrics.staleness_histogram([4], 1) == [0, 0, 0, 0, 1]  # past the bound: shown


def test_advantages_are_the_policys():
    torch = pytest.importorskip("torch")
    from policy.grpo import group_advantages

    rewards = [1.5, 0.5, 0.0, 1.5]
    # mean 0.875; unbiased std sqrt((0.625^2 * 2 + 0.375^2 + 0.875^2) / 3) = 0.75
    expected = [(r - 0.875) / (0.75 + 1e-4) for r in rewards]
    assert grpo_metrics.group_advantages(rewards) == pytest.approx(expected)
    assert grpo_metrics.group_advantages([0.5] * 4) == [0.0] * 4
    policy = group_advantages(torch.tensor([rewards], dtype=torch.float64))[0].tolist()
    assert grpo_metrics.group_advantages(rewards) == pytest.approx(policy, rel=1e-12)


def test_idle_fraction_and_controller_seconds_per_step():
    clock = grpo_metrics.StepClock()
    for g in hand_made_batch():  # idle 0.5 + 1 + 2, busy 1 + 2 + 4
        clock.received(g)
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:  # work: counted
        pass
    time.sleep(0.2)  # a wait: not counted
    lap = clock.lap()
    assert lap["rollout_idle_fraction"] == pytest.approx(3.5 / 10.5)
    assert 0.05 <= lap["controller_seconds"] < 0.2
    assert clock.lap()["rollout_idle_fraction"] == pytest.approx(3.5 / 10.5)  # none since


def test_record_family_keys_are_defined_and_unknown_ones_are_not():
    assert defs.metric_of("reward/accuracy_reward") is defs.METRICS["reward/<fn>"]
    assert defs.undefined_keys({"step": 1, "reward/x": 1.0, "reward_mean": 0.0}) == []
    assert defs.undefined_keys({"reward_avg": 1.0, "loss": 0.0}) == ["reward_avg"]


def test_docs_table_names_every_metric_and_no_other():
    text = (ROOT / "docs" / "metrics.md").read_text()
    tables = re.findall(r"^\| name \| unit \| runs \| how \|\n(?:\|.*\n)+", text, re.M)
    documented = {name for table in tables for name in re.findall(r"^\| `([^`]+)` \|", table, re.M)}
    assert documented == set(defs.METRICS), (
        f"docs/metrics.md lacks {sorted(set(defs.METRICS) - documented)}, "
        f"has unknown {sorted(documented - set(defs.METRICS))}"
    )


def test_docs_tables_are_generated_from_the_definitions():
    text = (ROOT / "docs" / "metrics.md").read_text()
    for name in ("CONTROLLER", "POLICY"):
        table = defs.markdown_table(getattr(defs, name))
        assert table in text, (
            f"docs/metrics.md: the {name} table is not gantry.comm.metrics's; regenerate it "
            f"with markdown_table({name}) (the command is on the page)"
        )


def grpo_controller(redis_url: str, run_dir: Path, *overrides: str) -> Controller:
    run_dir.mkdir()
    config = load_config(
        ROOT / "configs/quickstart-grpo.toml",
        ["rollout.n_generation=4", "train.train_batch_per_replica=12", "logging.log_interval=1",
         *overrides],
    )  # fmt: skip
    info = RunInfo(
        run_id="run", run_dir=str(run_dir), redis_url=redis_url, dataset_script="",
        dataset_size=64, model_path="",
    )  # fmt: skip
    controller = Controller(config, info)
    for stream in (info.keys.rollouts, info.keys.events):
        controller.context.plane.ensure_group(stream, GROUP)
    return controller


def policy_metrics() -> GRPOStepMetrics:
    """Whatever fields the policy's step reports, each 0.25."""
    return GRPOStepMetrics.model_validate(dict.fromkeys(GRPOStepMetrics.model_fields, 0.25))


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_step_record_and_its_sample_completions(redis_url, tmp_path):
    controller = grpo_controller(redis_url, tmp_path / "run")
    run, plan = controller.context, controller.plan
    run.state.version = run.state.steps_sent = 1
    plane = ControlPlane(redis_url)
    for g in hand_made_batch():
        plane.send(run.keys.rollouts, g)
    for delivery in plane.read_group([run.keys.rollouts], GROUP, GROUP, 16, 100):
        assert plan.handle(delivery)
    plan.advance()  # the policy is idle: the batch goes out
    controller._commit()
    (train,) = plane.read_next(run.keys.policy_commands, None)
    assert isinstance(train, TrainBatch) and train.step == 2
    assert [g.prompt_id for g in train.groups] == ["0:0", "0:1", "0:2"]
    assert train.groups == hand_made_batch()

    (logged,) = journal.load_list(run.plane, run.keys, "samples")
    assert logged["step"] == 2 and len(logged["samples"]) == 12  # 3 groups (<= 4) x 4
    first = logged["samples"][0]
    assert first == {
        "prompt_id": "0:0", "prompt": "prompt 0", "completion": "3 tokens", "reward": 1.5,
        "reward/correct": 1.0, "reward/format": 0.5, "advantage": pytest.approx(0.625 / 0.7501),
        "policy_version": 1, "finish_reason": "stop",
    }  # fmt: skip
    assert [row["advantage"] for row in logged["samples"][4:8]] == [0.0] * 4

    controller._on_step_done(StepDone(step=2, metrics=policy_metrics()))
    controller._commit()
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert defs.undefined_keys(record) == []
    expected = grpo_metrics.rollout_metrics(hand_made_batch(), STALENESS, 1)
    assert {k: record[k] for k in expected} == expected
    assert record["rollout_idle_fraction"] == pytest.approx(3.5 / 10.5)
    assert record["completion_tokens_per_s"] == pytest.approx(33 * record["samples_per_s"] / 12)
    assert record["controller_seconds"] > 0 and record["loss"] == 0.25
    assert record["prompt_ids"] == ["0:0", "0:1", "0:2"]


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_the_rollout_worker_measures_texts_rewards_and_time(redis_url, tmp_path, tiny_llm):
    from rollout.worker import GROUP as ROLLOUT_GROUP
    from rollout.worker import RolloutWorker

    config = load_config(
        ROOT / "configs/quickstart-grpo.toml",
        ["rollout.backend=transformers", "rollout.n_generation=4", "rollout.batch_size=2"],
    )
    info = RunInfo(
        run_id="run", run_dir=str(tmp_path), redis_url=redis_url,
        dataset_script=str(ROOT / "datasets/arithmetic.py"), dataset_size=64,
        model_path=str(tiny_llm),
    )  # fmt: skip
    worker = RolloutWorker(config, info, "0")
    worker.plane.ensure_group(worker.prompts, ROLLOUT_GROUP)
    worker.plane.send_many(worker.prompts, [PromptTask(prompt_id=f"0:{i}", epoch=0, index=i)
                                            for i in (3, 5)])  # fmt: skip
    worker.activity.set("idle", "waiting for prompts")
    time.sleep(0.3)
    worker._roll_out(worker._next_prompts())
    assert worker.activity.state == "idle"
    groups = worker.plane.read_next(info.keys.rollouts, None)
    assert [g.prompt_id for g in groups] == ["0:3", "0:5"]
    tokenizer = worker.tokenizer
    for g in groups:
        assert g.reward_names == ["correct_reward", "format_reward"]
        prompt_ids = tokenizer(g.prompt_text, add_special_tokens=False)["input_ids"]
        assert list(prompt_ids) == g.prompt_token_ids
        data = worker.samples[int(g.prompt_id.split(":")[1])]
        for s in g.samples:
            assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)
            assert s.reward_parts == worker.script.score_parts(s.text, data, 0)
            assert s.reward == sum(s.reward_parts)
            truncated = len(s.token_ids) == config.rollout.max_response_length
            assert (s.finish_reason == "length") == truncated
    first, second = groups
    for key in ("generation_seconds", "scoring_seconds", "idle_seconds", "busy_seconds"):
        assert getattr(first, key) == getattr(second, key)  # equal shares of the batch
    assert 2 * first.idle_seconds >= 0.3
    assert 2 * first.generation_seconds > 0 and 2 * first.scoring_seconds > 0
    worked = 2 * (first.generation_seconds + first.scoring_seconds)
    assert 2 * first.busy_seconds == pytest.approx(worked, abs=0.05)
