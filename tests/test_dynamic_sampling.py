"""DAPO's dynamic sampling in the controller (controller.grpo with a real redis-server): groups
whose completions all got the same reward are dropped, counted as visited and never trained nor
retried, new prompts refill the batch, the step's draws are bounded, and a restarted
controller keeps what it dropped."""

from __future__ import annotations

import pytest

from controller import journal
from controller.grpo import GRPOPlan
from controller.plan import Run, RunFailed
from controller.scheduler import PromptQueue
from controller.state import state_from_json, state_to_json
from gantry.comm.protocol import Register, RolloutGroup, Sample, TrainBatch
from gantry.comm.transport import ControlPlane, Delivery
from gantry.config import load_config
from gantry.run.runtime import RunInfo

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
GROUPS = 2  # per step


def make_run(redis_url, tmp_path, dataset_size=10, **policy) -> tuple[Run, GRPOPlan]:
    overrides = [f"train.train_policy.{key}={value}" for key, value in policy.items()]
    config = load_config(None, ["train.train_policy.variant=dapo", *overrides])
    info = RunInfo(
        run_id="dapo",
        run_dir=str(tmp_path),
        redis_url=redis_url,
        dataset_script="x.py",
        dataset_size=dataset_size,
        model_path="m",
    )
    plane = ControlPlane(redis_url)
    run = Run(
        config=config,
        info=info,
        plane=plane,
        out=journal.Outbox(plane, info.keys),
        queue=PromptQueue(dataset_size, 1, seed=0),
        total_steps=3,
        groups_per_step=GROUPS,
    )
    plan = GRPOPlan(run)
    register = Register(role="rollout", replica="0", pid=1, host="h")
    plan.handle(Delivery(info.keys.events, "1-0", register))
    return run, plan


def result(prompt_id: str, rewards: list[float]) -> Delivery:
    samples = [
        Sample(token_ids=[1], logprobs=[-0.1], reward=r, finish_reason="stop", reward_parts=[r])
        for r in rewards
    ]
    group = RolloutGroup(
        prompt_id=prompt_id, replica="0", policy_version=0, prompt_token_ids=[5], samples=samples
    )
    return Delivery("rollouts", f"{abs(hash(prompt_id)) % 10**9}-0", group)


def dispatched(run: Run) -> list[str]:
    return [m.prompt_id for m in run.plane.read_next(run.keys.prompts("0"), None, count=100)]


def test_filter_reward_metric_decides_on_the_named_rewards_only():
    """cosmos-rl's filter_reward_metric: a group whose `correct` values are all equal is
    dropped although its format reward varies; a name the script does not have is one line."""
    from controller.scheduler import RolloutBuffer
    from gantry.comm.protocol import RolloutGroup, Sample
    from gantry.config import ConfigError, load_config

    def group(pid, parts):
        samples = [Sample(token_ids=[1], logprobs=[0.0], reward=sum(p), reward_parts=list(p),
                          finish_reason="stop") for p in parts]  # fmt: skip
        return RolloutGroup(prompt_id=pid, replica="0", policy_version=0, prompt_token_ids=[1],
                            samples=samples, reward_names=["correct", "format"])  # fmt: skip

    buffer = RolloutBuffer(2, 4, drop_equal=True, filter_names=["correct"])
    assert buffer.add(group("0:0", [(1.0, 0.0), (1.0, 0.5)]), "1-0", 0) == "dropped"
    assert buffer.add(group("0:1", [(1.0, 0.0), (0.0, 0.0)]), "2-0", 0) == "accepted"
    plain = RolloutBuffer(2, 4, drop_equal=True)
    assert plain.add(group("0:0", [(1.0, 0.0), (1.0, 0.5)]), "1-0", 0) == "accepted"
    wrong = RolloutBuffer(2, 4, drop_equal=True, filter_names=["accuracy"])
    with pytest.raises(ConfigError, match=r"filter_reward_metric names \['accuracy'\].*'format'"):
        wrong.add(group("0:2", [(1.0, 0.0), (1.0, 0.0)]), "3-0", 0)
    config = load_config(None, ["train.train_policy.variant=dapo",
                                "train.train_policy.filter_reward_metric=correct"])  # fmt: skip
    assert config.train.train_policy.filter_reward_metric == ["correct"]
    with pytest.raises(ConfigError, match="filter_reward_metric is read with variant = 'dapo'"):
        load_config(None, ["train.train_policy.filter_reward_metric=correct"])


def test_equal_groups_are_dropped_and_new_prompts_fill_the_batch(redis_url, tmp_path):
    run, plan = make_run(redis_url, tmp_path)
    plan.advance()
    run.out.commit(state_to_json(run.state))
    first = dispatched(run)
    assert len(first) == 3 * GROUPS  # the staleness budget: every step's prompts
    a, b, c, d = first[:4]
    for prompt_id, rewards in ((a, [1.0, 1.0]), (b, [0.0, 1.0]), (c, [0.0, 0.0])):
        plan.handle(result(prompt_id, rewards))
    plan.advance()  # one group kept: no batch yet, and two more prompts replace the dropped
    run.out.commit(state_to_json(run.state))
    assert run.state.in_flight is None
    refill = dispatched(run)
    assert len(refill) == 2 and not set(refill) & set(first)
    plan.handle(result(d, [1.0, 0.0]))
    plan.advance()
    run.out.commit(state_to_json(run.state))
    (batch,) = run.plane.read_next(run.keys.policy_commands, None)
    assert isinstance(batch, TrainBatch) and [g.prompt_id for g in batch.groups] == [b, d]
    metrics = run.state.in_flight.metrics
    assert metrics["dapo_groups_drawn"] == 4 and metrics["dapo_groups_dropped"] == 2
    assert metrics["dropped_prompt_ids"] == [a, c]
    # Visited, not trained: never handed out again, not pending for a checkpoint.
    assert a not in plan.untrained() and c not in plan.untrained()
    assert {a, c} <= journal.load_set(run.plane, run.keys, "seen")
    assert plan.result()["dapo_groups_dropped"] == 2


def test_a_step_stops_at_its_draw_bound_with_one_line(redis_url, tmp_path):
    run, plan = make_run(redis_url, tmp_path, max_retry_for_on_policy=2)
    plan.advance()
    run.out.commit(state_to_json(run.state))
    prompts = dispatched(run)
    plan.handle(result(prompts[0], [1.0, 1.0]))
    plan.handle(result(prompts[1], [0.0, 0.0]))  # 2 dropped + 2 to keep = 2 x 2 drawn: allowed
    with pytest.raises(RunFailed) as excinfo:
        plan.handle(result(prompts[2], [0.5, 0.5]))
    message = str(excinfo.value)
    assert "\n" not in message and "step 1" in message and "dropped 3" in message
    assert "max_retry_for_on_policy = 2 allows 4 per step" in message


def test_without_a_bound_a_pass_over_the_dataset_of_equal_groups_stops(redis_url, tmp_path):
    run, plan = make_run(redis_url, tmp_path, dataset_size=3)
    for index in range(3):
        plan.handle(result(f"0:{index}", [0.0, 0.0]))
    with pytest.raises(RunFailed, match="a whole pass over the dataset gave no group"):
        plan.handle(result("1:0", [0.0, 0.0]))


def test_dropped_prompts_are_replaced_from_a_further_pass_over_the_dataset(redis_url, tmp_path):
    run, plan = make_run(redis_url, tmp_path, dataset_size=3)
    ids = [run.queue.next().prompt_id for _ in range(5)]
    assert [i.split(":")[0] for i in ids] == ["0", "0", "0", "1", "1"]


def test_a_restarted_controller_keeps_what_was_dropped(redis_url, tmp_path):
    run, plan = make_run(redis_url, tmp_path)
    dropped = result("0:4", [1.0, 1.0])
    plan.handle(dropped)
    plan.capture(run.state)
    run.out.commit(state_to_json(run.state))
    # A new controller reads the snapshot back and meets the same result again (re-delivery).
    again, plan2 = make_run(redis_url, tmp_path)
    state = state_from_json(journal.load_state(again.plane, again.keys))
    again.state = state
    assert plan2.restore(state, []) == []
    assert plan2.buffer.stats.dropped_since_batch == ["0:4"]
    assert plan2.buffer.add(dropped.message, dropped.entry_id, 0) == "duplicate"


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_dapo_run_trains_only_groups_with_a_signal_each_prompt_once(tmp_path):
    """Through the launcher: DAPO with the overlong penalty on the quickstart task (the tiny
    random model's groups are mostly equal: many are dropped and replaced)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml",
         "datasets/arithmetic.py", f"train.output_dir={tmp_path}", "rollout.backend=transformers",
         "custom.size=64", "train.train_batch_per_replica=32", "rollout.n_generation=4",
         "train.train_policy.mini_batch=32", "logging.log_interval=1", "train.max_num_steps=2",
         "train.train_policy.variant=dapo",
         "train.train_policy.overlong_reward.enable_overlong_penalty=true",
         "train.train_policy.overlong_reward.buffer_length=2"],
        cwd=root, capture_output=True, text=True, timeout=450,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2]
    trained = [p for m in metrics for p in m["prompt_ids"]]
    dropped = [p for m in metrics for p in m["dropped_prompt_ids"]]
    assert len(set(trained)) == len(trained) == 2 * 8 and not set(trained) & set(dropped)
    for m in metrics:
        assert m["groups_all_equal_fraction"] == 0.0  # only groups with a learning signal
        assert m["dapo_groups_drawn"] == 8 + m["dapo_groups_dropped"]
        assert 0.0 <= m["overlong_penalised_fraction"] <= 1.0 and "reward/overlong" in m
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["dapo_groups_dropped"] >= len(dropped)
