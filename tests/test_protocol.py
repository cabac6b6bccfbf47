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
GRPO_METRICS = p.GRPOStepMetrics(
    loss=0.5, kl_ref=0.0, kl_behaviour=0.01, ratio_mean=1.0, ratio_max=1.4, clip_fraction=0.1,
    clip_low_fraction=0.04, clip_high_fraction=0.06, entropy=2.5, logprob_gap_mean=0.02,
    grad_norm=2.0, lr=1e-5, tokens=96.0, policy_seconds=0.3, policy_forward_s=0.1,
    policy_backward_s=0.15, policy_optimizer_s=0.05, policy_idle_fraction=0.4,
    weight_sync_s=0.02, weight_sync_wait_s=0.1, weight_sync_gbps=1.5, weight_sync_efficiency=0.8,
)  # fmt: skip
SFT_METRICS = p.SFTStepMetrics(
    loss=1.5, grad_norm=0.7, lr=2e-5, tokens=400.0, assistant_tokens=120.0,
    tokens_per_s=900.0, policy_seconds=0.4, truncated_samples=1.0, padding_fraction=0.25,
    policy_idle_fraction=0.1,
)  # fmt: skip
VALIDATION = p.ValidationMetrics(val_loss=1.25, val_tokens=40.0, val_samples=4.0, val_seconds=0.2)
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
    p.StepDone(step=3, metrics=GRPO_METRICS),
    p.Export(step=3, path="/x", final=True),
    p.SFTBatch(step=2, indices=[4, 0, 7]),
    p.Validate(step=5),
    p.ValidationDone(step=5, metrics=VALIDATION),
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


def test_step_metrics_keep_their_kind_and_values_through_the_codec():
    for metrics in (GRPO_METRICS, SFT_METRICS):
        decoded = p.decode(p.encode(p.StepDone(step=1, metrics=metrics)))
        assert type(decoded.metrics) is type(metrics)
        assert decoded.metrics.model_dump() == metrics.model_dump()
    # The names of metrics.jsonl, in the order the trainers reported them.
    assert list(GRPO_METRICS.model_dump()) == [
        "loss", "kl_ref", "kl_behaviour", "ratio_mean", "ratio_max", "clip_fraction",
        "clip_low_fraction", "clip_high_fraction", "entropy", "logprob_gap_mean",
        "dual_clip_fraction", "behav_imp_weight_mean", "behav_imp_weight_max",
        "behav_imp_weight_capped_fraction", "grad_norm", "lr", "tokens", "policy_seconds", "policy_forward_s", "policy_backward_s",
        "policy_optimizer_s", "policy_idle_fraction", "weight_sync_s", "weight_sync_wait_s",
        "weight_sync_gbps", "weight_sync_efficiency",
    ]  # fmt: skip
    assert list(SFT_METRICS.model_dump()) == [
        "loss", "grad_norm", "lr", "tokens", "assistant_tokens",
        "tokens_per_s", "policy_seconds", "truncated_samples", "padding_fraction",
        "policy_idle_fraction",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", [p.GRPOStepMetrics, p.SFTStepMetrics, p.ValidationMetrics])
def test_metrics_with_a_missing_or_an_extra_field_are_refused(kind):
    sample = {p.GRPOStepMetrics: GRPO_METRICS, p.SFTStepMetrics: SFT_METRICS}.get(kind, VALIDATION)
    fields = sample.model_dump()
    missing = dict(list(fields.items())[1:])
    with pytest.raises(ValidationError, match="Field required"):
        kind(**missing)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        kind(**fields, surprise=1.0)
    event = p.ValidationDone if kind is p.ValidationMetrics else p.StepDone
    for bad in (missing, {**fields, "surprise": 1.0}):
        with pytest.raises(ValidationError):
            p.decode(msgpack.packb({"type": event.model_fields["type"].default, "step": 1,
                                    "metrics": bad}))  # fmt: skip
