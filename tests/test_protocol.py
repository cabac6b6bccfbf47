"""Message codec round trips and decoding errors."""

import msgpack
import pytest
from pydantic import ValidationError

from gantry.comm import protocol as p

PLAN = p.SyncPlan(
    group="run/plan1",
    host="127.0.0.1",
    port=29500,
    receivers=[p.Receiver(replica="0", ranks=2), p.Receiver(replica="1", ranks=1)],
    timeout_s=60.0,
)
SAMPLES = [
    p.PromptTask(prompt_id="0:3", epoch=0, index=3),
    p.SyncWeights(version=7, plan=PLAN),
    p.Stop(reason="done"),
    p.RolloutGroup(
        prompt_id="1:2",
        replica="0",
        policy_version=4,
        prompt_token_ids=[1, 2, 3],
        samples=[
            p.Sample(token_ids=[5, 6], logprobs=[-0.25, -1.5], reward=1.0, finish_reason="stop")
        ],
    ),
    p.Register(role="rollout", replica="1", pid=42, host="h"),
    p.StepDone(step=3, metrics={"loss": 0.5}),
    p.Export(step=3, path="/x", final=True),
    p.SFTBatch(step=2, indices=[4, 0, 7]),
    p.Validate(step=5),
    p.ValidationDone(step=5, metrics={"val_loss": 1.25, "val_tokens": 40.0}),
    p.ExportDone(step=3, path="/x", final=False),
    p.WeightsSynced(replica="0", version=2, seconds=0.1),
    p.WorkerFailed(role="policy", replica="0", error="boom"),
    p.Checkpoint(step=4, path="/run/checkpoints/step_4"),
    p.CheckpointSaved(step=4, path="/run/checkpoints/step_4", seconds=1.5),
    p.UploadDone(name="final", destination="s3://b/p/final", ok=False, error="denied"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type)
def test_round_trip(message):
    decoded = p.decode(p.encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_train_batch_round_trip_keeps_floats_exact():
    group = SAMPLES[3]
    batch = p.TrainBatch(step=1, groups=[group, group])
    assert p.decode(p.encode(batch)).groups[1].samples[0].logprobs == [-0.25, -1.5]


def test_every_message_type_is_decodable():
    assert {m.type for m in SAMPLES} | {"train_batch"} == {
        t.model_fields["type"].default for t in p.MESSAGE_TYPES
    }


def test_unknown_type_and_extra_field_are_rejected():
    with pytest.raises(ValidationError):
        p.decode(msgpack.packb({"type": "nope"}))
    with pytest.raises(ValidationError):
        p.decode(msgpack.packb({"type": "sync_weights", "version": 1, "extra": 2}))


def test_keys_are_namespaced_by_run():
    keys = p.Keys("run1")
    assert keys.prompts("0") == "gantry:run1:prompts:0"
    assert keys.commands("rollout", "2") == "gantry:run1:commands:rollout:2"
    assert p.Keys("run2").prompts("0") != keys.prompts("0")


def test_sync_plan_numbers_every_rollout_rank_after_the_sender():
    assert [PLAN.rank_of("0", 0), PLAN.rank_of("0", 1), PLAN.rank_of("1", 0)] == [1, 2, 3]
    assert PLAN.receiver_ranks == 3
    with pytest.raises(ValueError, match="not in weight-sync plan"):
        PLAN.rank_of("2", 0)
    with pytest.raises(ValueError, match="has 1 ranks"):
        PLAN.rank_of("1", 1)
