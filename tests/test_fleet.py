"""The controller's view of the rollout replicas: prompts by free room under the staleness
budget, sync plans per membership, versions checked on results."""

from __future__ import annotations

import pytest

from controller.fleet import RolloutFleet


def fleet(capacity: int = 4) -> RolloutFleet:
    return RolloutFleet(capacity=capacity, run_id="r", host="127.0.0.1", port=1, timeout_s=5.0)


def test_prompts_go_to_the_replica_with_most_free_room():
    f = fleet(capacity=4)
    f.register("0", 1, holds_version=0, policy_version=0)
    f.register("1", 2, holds_version=0, policy_version=0)
    for i in range(3):
        f.dispatched("0", f"0:{i}")  # replica 0 is busy with 3 prompts, replica 1 idle
    picks = f.assign(4, {"0": 10, "1": 10})
    assert picks == ["1", "1", "1", "0"]  # 4 free, then both at 1: ties go by name
    assert f.assign(10, {"0": 10, "1": 10}) == ["1", "1", "1", "0", "1"]  # all the room left


def test_budget_caps_the_total_and_keeps_a_replica_behind_out():
    f = fleet(capacity=8)
    f.register("0", 1, holds_version=3, policy_version=3)
    f.register("late", 1, holds_version=0, policy_version=3)
    # "late" still holds the initial weights: nothing it generates now would be trainable.
    assert f.assign(5, {"0": 5, "late": 0}) == ["0"] * 5
    assert f.assign(5, {"0": 2, "late": 5}) == ["0", "late", "late", "late", "late"]
    assert f.behind(3) == ["late"]
    f.synced(["late"], 3)
    assert f.behind(3) == []


def test_one_plan_per_membership_and_a_restart_voids_it():
    f = fleet()
    f.register("0", 2, holds_version=0, policy_version=0)
    f.register("1", 1, holds_version=0, policy_version=0)
    both = f.plan(["1", "0"])
    assert f.plan(["0", "1"]) is both
    assert [(r.replica, r.ranks) for r in both.receivers] == [("0", 2), ("1", 1)]
    alone = f.plan(["1"])
    assert alone.group != both.group
    f.register("0", 2, holds_version=0, policy_version=5)  # replica 0 restarted
    again = f.plan(["0", "1"])
    assert again.group not in {both.group, alone.group}
    assert f.plan(["1"]) is alone  # groups without the restarted replica stay valid


def test_results_are_counted_and_their_version_checked():
    f = fleet()
    f.register("0", 1, holds_version=0, policy_version=0)
    f.dispatched("0", "0:1")
    f.synced(["0"], 2)
    f.dispatched("0", "0:2")  # handed out after the sync to v2 was ordered
    f.returned("0", "0:1", 1)  # generated before the sync: fine
    with pytest.raises(RuntimeError, match="generated 0:2 with weights v1"):
        f.returned("0", "0:2", 1)
    assert f.stats()["0"]["groups"] == 2 and f.in_flight == {}


def test_a_dropped_replica_leaves_its_syncs_and_a_called_off_sync_falls_back():
    f = fleet()
    f.register("0", 1, holds_version=0, policy_version=0)
    f.register("1", 1, holds_version=0, policy_version=0)
    both = f.plan(["0", "1"])
    f.synced(["0", "1"], 1)
    f.dispatched("0", "0:4")  # handed out after the order: must carry v1 ...
    f.sync_called_off(["0"])  # ... until the sync is called off: v0 is what it holds
    assert f.replicas["0"].version == 0 and f.replicas["0"].in_flight == {"0:4": 0}
    f.returned("0", "0:4", 0)  # no complaint: v0 is now the least it can carry
    f.dispatched("1", "0:5")
    gone = f.drop("1", "died")
    assert gone.in_flight == {"0:5": 1} and "1" not in f.replicas
    assert f.departed == [{"replica": "1", "left": "died", **gone.stats()}]
    assert f.plan(["0"]) != both and f.plan(["0"]).group != both.group
    f.confirmed("0", 2)
    assert f.replicas["0"].held == 2


def test_the_fleet_comes_back_from_its_state_with_the_same_plans_and_prompts():
    import json

    f = fleet(capacity=4)
    f.register("0", 2, holds_version=0, policy_version=0)
    f.register("1", 1, holds_version=0, policy_version=0)
    plan = f.plan(["0", "1"])
    f.synced(["0", "1"], 1)
    f.dispatched("0", "0:3")
    f.register("2", 1, holds_version=0, policy_version=1)
    f.drop("2", "died")
    restored = fleet(capacity=4)
    restored.restore(json.loads(json.dumps(f.state())))
    assert restored.plan(["0", "1"]) == plan  # the same group: its process groups are reused
    assert restored.plan(["0"]).group != plan.group  # a new membership gets a new name
    assert restored.in_flight == {"0:3": "0"}
    assert restored.replicas["0"].version == 1 and restored.departed == f.departed
    restored.returned("0", "0:3", version=1)
    assert restored.replicas["0"].groups == 1


@pytest.mark.redis
@pytest.mark.timeout(60)
@pytest.mark.parametrize("interval", [1, 2])
def test_catch_up_syncs_only_replicas_behind_the_last_scheduled_sync(redis_url, tmp_path, interval):
    """With train.sync_weight_interval = 2, a replica holding v2 while the policy is at v3
    waits for the v4 sync; a joiner holding the model's weights gets v3 at once."""
    from gantry.comm.protocol import SyncWeights
    from gantry.comm.transport import ControlPlane
    from tests.test_metrics import grpo_controller

    controller = grpo_controller(
        redis_url, tmp_path / "run", f"train.sync_weight_interval={interval}",
        "train.train_policy.allowed_outdated_steps=2",
    )  # fmt: skip
    run, plan = controller.context, controller.plan
    run.state.version = run.state.steps_sent = 3
    plan.fleet.register("a", 1, holds_version=2, policy_version=2)
    plan.fleet.register("joiner", 1, holds_version=0, policy_version=3)
    plan._catch_up_joiners()
    controller._commit()
    plane = ControlPlane(redis_url)
    syncs = [
        m for m in plane.read_next(run.keys.policy_commands, None) if isinstance(m, SyncWeights)
    ]
    assert len(syncs) == 1 and syncs[0].version == 3
    members = [r.replica for r in syncs[0].plan.receivers]
    assert members == (["joiner"] if interval == 2 else ["a", "joiner"])
