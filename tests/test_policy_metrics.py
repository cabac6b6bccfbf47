"""The policy's step metrics against values computed by hand: entropy of known logits, the
importance ratio's max and both sides of clipping, the log-prob gap, SFT padding, the idle
fraction of a sequence of activity states, the weight-sync figures (and the probe they are
compared with, over real gloo groups), and a GRPO step on a tiny model whose rollout log-probs
are the policy's own, shifted by a known amount."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from gantry.comm import weights as communicator
from gantry.comm.metrics import POLICY
from gantry.comm.protocol import GRPOStepMetrics, Receiver, SFTStepMetrics, SyncPlan
from gantry.comm.weights import Manifest, ManifestEntry, SendStats
from gantry.launch.redis_server import free_port
from gantry.run import activity as activity_module
from gantry.run.activity import Activity
from policy.grpo import grpo_loss, ratio_statistics
from policy.step_metrics import (
    PhaseClock,
    idle_fraction,
    padding_counts,
    sync_metrics,
    token_entropy,
)
from policy.trainer import Row, completion_logprobs, pack_rows
from tests.distributed_helpers import ROOT


def test_every_reported_name_is_defined_with_a_unit_and_a_definition():
    for model in (GRPOStepMetrics, SFTStepMetrics):
        for name in model.model_fields:
            assert name in POLICY, f"{model.__name__}.{name} is not in gantry.comm.metrics"
            assert POLICY[name].how


# ---- entropy -------------------------------------------------------------------------------


def test_entropy_of_known_distributions():
    uniform = torch.log_softmax(torch.zeros(1, 1, 8), dim=-1)
    assert token_entropy(uniform).item() == pytest.approx(math.log(8))
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    skewed = torch.tensor([[[0.5, 0.25, 0.25]]]).log()
    assert token_entropy(skewed).item() == pytest.approx(1.5 * math.log(2))
    # A banned token (-inf) adds nothing: the entropy of the other two, uniform.
    banned = torch.log_softmax(torch.tensor([[[0.0, 0.0, float("-inf")]]]), dim=-1)
    assert token_entropy(banned).item() == pytest.approx(math.log(2))


def test_entropy_chunks_change_nothing_and_carry_no_gradient():
    logits = torch.randn(7, 3, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logprobs = torch.log_softmax(logits, dim=-1)
    whole = token_entropy(logprobs)
    assert not whole.requires_grad
    assert torch.allclose(token_entropy(logprobs, chunk_elements=25), whole)
    p = logprobs.exp()
    assert torch.allclose(whole, -(p * logprobs).sum(-1))


def test_completion_entropy_at_the_sampling_temperature_on_completion_tokens_only():
    """Through the trainer's path (logits at the completion positions only) with a stand-in
    model whose logits are known: 0 outside the completions, H(softmax(z / T)) inside."""
    vocab, temperature = 5, 0.5
    rows = [Row([1, 2, 3, 4], 2, [-1.0, -1.0], 0.0), Row([1, 2, 3], 1, [-1.0, -1.0], 0.0)]
    batch = pack_rows(rows, pad_token_id=0, device=torch.device("cpu"))
    table = torch.arange(vocab, dtype=torch.float32) / 3  # the logits at every position

    class Known(torch.nn.Module):
        def forward(self, input_ids, attention_mask, logits_to_keep):
            logits = table.expand(input_ids.shape[0], len(logits_to_keep), vocab)
            return type("Out", (), {"logits": logits})()

    _, entropy = completion_logprobs(Known(), batch, temperature, entropy=True)
    p = torch.softmax(table / temperature, dim=-1)
    expected = float(-(p * p.log()).sum())
    assert entropy[batch.completion_mask == 1].tolist() == pytest.approx([expected] * 4)
    assert entropy[batch.completion_mask == 0].abs().sum() == 0


# ---- ratio, clipping, log-prob gap ---------------------------------------------------------


def test_ratio_max_and_both_sides_of_clipping_hand_computed():
    # ratios: row 0 (A = -1): 0.5 low-clipped, 1.5 not (A < 0 keeps it), 1.0, masked 9.0;
    #         row 1 (A = +2): 0.5 not (A > 0 keeps it), 1.5 high-clipped, 1.1, 1.25 high.
    ratio = torch.tensor([[0.5, 1.5, 1.0, 9.0], [0.5, 1.5, 1.1, 1.25]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([[-1.0], [2.0]])
    stats = ratio_statistics(ratio, adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    assert stats["ratio_max"] == pytest.approx(1.5)  # the masked 9.0 does not count
    assert stats["ratio_mean"] == pytest.approx((0.5 + 1.5 + 1.0 + 0.5 + 1.5 + 1.1 + 1.25) / 7)
    assert stats["clip_low_fraction"] == pytest.approx(1 / 7)
    assert stats["clip_high_fraction"] == pytest.approx(2 / 7)
    assert stats["clip_fraction"] == pytest.approx(3 / 7)
    # A zero advantage never clips; a wider epsilon_high clips less.
    none = ratio_statistics(ratio, torch.zeros(2, 1), mask, epsilon_low=0.2, epsilon_high=0.2)
    assert none["clip_fraction"] == 0.0
    wide = ratio_statistics(ratio, adv, mask, epsilon_low=0.2, epsilon_high=0.3)
    assert wide["clip_high_fraction"] == pytest.approx(1 / 7)


def test_clip_fraction_is_where_the_loss_takes_the_clipped_term():
    """On random batches: the tokens counted are exactly those whose per-token loss has no
    gradient through the ratio (the clipped branch of the minimum)."""
    gen = torch.Generator().manual_seed(1)
    behaviour = -torch.rand(6, 9, generator=gen) * 3
    logp = (behaviour + torch.randn(6, 9, generator=gen) * 0.4).requires_grad_(True)
    adv, mask = torch.randn(6, generator=gen), (torch.rand(6, 9, generator=gen) > 0.2).float()
    loss, stats = grpo_loss(logp, behaviour, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    loss.backward()
    no_gradient = ((logp.grad == 0) & (mask == 1)).sum() / mask.sum()
    assert stats["clip_fraction"] == pytest.approx(float(no_gradient))
    assert stats["clip_low_fraction"] > 0 and stats["clip_high_fraction"] > 0


def test_logprob_gap_hand_computed():
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    logp = torch.tensor([[-1.2, -1.9, -0.5], [-0.4, -3.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 7.0 gap is padding
    _, stats = grpo_loss(logp, behaviour, torch.zeros(2), mask, epsilon_low=0.2, epsilon_high=0.2)
    assert stats["logprob_gap"] == pytest.approx((0.2 + 0.1 + 0.0 + 0.3 + 0.0) / 5)


# ---- SFT padding, idle fraction, sync, phases ----------------------------------------------


def test_padding_fraction_of_padded_batches():
    # Batch 1: rows of 3 and 1 tokens padded to 3 (2 pads of 6); batch 2: 2 tokens, no pad.
    masks = [torch.tensor([[1, 1, 1], [1, 0, 0]]), torch.tensor([[1, 1]])]
    pad, total = padding_counts(masks)
    assert (pad, total) == (2.0, 8.0)


def test_idle_fraction_of_a_sequence_of_activity_states(monkeypatch):
    clock = [100.0]
    fake = type("FakeTime", (), {"monotonic": lambda: clock[0], "time": time.time})
    monkeypatch.setattr(activity_module, "time", fake)
    activity = Activity("policy", "0")
    activity.set("idle")
    activity.take_totals()  # the window starts here (the worker does this before its loop)
    for state, seconds in [("training", 3), ("syncing", 1), ("idle", 4), ("checkpointing", 2)]:
        activity.set(state)
        clock[0] += seconds
    activity.set("idle")
    clock[0] += 2  # idle until the next step starts
    activity.set("training")
    clock[0] += 3  # the step, up to its end: the metrics take the totals now
    totals = activity.take_totals()
    assert totals == {"training": 6.0, "syncing": 1.0, "idle": 6.0, "checkpointing": 2.0}
    assert idle_fraction(totals) == pytest.approx(6 / 15)
    clock[0] += 5
    assert idle_fraction(activity.take_totals()) == 0.0  # the next window: training only
    assert idle_fraction({}) == 0.0


def test_sync_metrics_of_the_latest_send():
    stats = SendStats(bytes=3_000_000_000, wait_s=0.25, send_s=1.5, setup_s=0.5, raw_gbps=4.0)
    assert sync_metrics(stats) == {
        "weight_sync_s": 1.5,
        "weight_sync_wait_s": 0.25,
        "weight_sync_gbps": pytest.approx(2.0),
        "weight_sync_efficiency": pytest.approx(0.5),
    }
    assert set(sync_metrics(None).values()) == {0.0}  # before the first sync


def test_phase_clock_sums_each_phase_over_its_turns():
    clock = PhaseClock(torch.device("cpu"))
    for _ in range(2):
        with clock.phase("forward"):
            time.sleep(0.02)
    with clock.phase("backward"):
        pass
    assert 0.04 <= clock.seconds["forward"] < 0.5
    assert clock.seconds["backward"] < 0.02
    assert clock.seconds["optimizer"] == 0.0


@pytest.mark.timeout(60)
def test_a_sync_reports_its_throughput_against_a_plain_broadcast_timed_when_the_group_formed():
    """A sender and a receiver (a thread) over real gloo groups: the first sync of a plan
    forms the group and times the probe (setup_s > 0), the second reuses both; the weights
    arrive intact either way."""
    port = free_port()
    store = communicator.connect_store("127.0.0.1", port, host_it=True, timeout_s=20)
    plan = SyncPlan(group="t/probe", host="127.0.0.1", port=port, timeout_s=20.0,
                    receivers=[Receiver(replica="0", ranks=1)])  # fmt: skip
    weights = {"w": torch.arange(4096.0).view(256, 16), "b": torch.arange(16.0)}
    entries = [
        ManifestEntry(n, tuple(t.shape), "float32", (t.shape[0],)) for n, t in weights.items()
    ]
    manifest = Manifest(entries, senders=1, bucket_bytes=1 << 14, direct_min_bytes=1 << 20)
    assert communicator.probe_numel(manifest, 0) == 4096 + 16  # its share: 16448 bytes
    received: list[dict] = []

    def receive() -> None:
        client = communicator.connect_store("127.0.0.1", port, host_it=False, timeout_s=20)
        receiver = communicator.Receiver(manifest, client, "cpu")
        for version in (1, 2):
            got = {}
            for bucket in receiver.receive(plan, version, "0", 0):
                got.update({name: t.clone() for name, t in bucket})
            received.append(got)

    thread = threading.Thread(target=receive)
    thread.start()
    sender = communicator.Sender(manifest, 0, store)
    first = sender.send(plan, 1, lambda e: weights[e.name])
    second = sender.send(plan, 2, lambda e: weights[e.name])
    thread.join(timeout=30)
    assert not thread.is_alive() and len(received) == 2
    for got in received:
        assert all(torch.equal(got[n], t) for n, t in weights.items())
    assert first.bytes == second.bytes == (4096 + 16) * 4
    assert first.setup_s > 0 and second.setup_s == 0.0
    assert first.raw_gbps > 0 and second.raw_gbps == first.raw_gbps
    assert sync_metrics(second)["weight_sync_efficiency"] > 0


# ---- a GRPO step on a tiny model ------------------------------------------------------------

STEP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from gantry.config import load_config
    from gantry.comm.protocol import RolloutGroup, Sample
    from policy.parallel import build_mesh, init_distributed
    from policy.trainer import GRPOTrainer
    from policy.worker import parallel_dims

    model_dir, out, temperature, delta = sys.argv[1], sys.argv[2], 0.7, 0.3
    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rewards = [1.0, 0.0, 0.5, 0.5]  # advantages +, -, 0, 0
    groups, hand = [], {"tokens": 0, "entropy": 0.0, "low": 0, "high": 0}
    for g in range(3):
        prompt = torch.randint(3, 200, (4 + g,), generator=gen).tolist()
        samples = []
        for j, reward in enumerate(rewards):
            completion = torch.randint(3, 200, (2 + (g + j) % 3,), generator=gen).tolist()
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
            every = torch.log_softmax(logits, dim=-1)
            logp = every.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
            shift = torch.tensor([delta if t % 2 == 0 else -delta for t in range(len(completion))])
            samples.append(Sample(token_ids=completion, logprobs=(logp + shift).tolist(),
                                  reward=reward, finish_reason="stop"))
            hand["tokens"] += len(completion)
            hand["entropy"] += float(-(every.exp() * every).sum())
            # ratio = exp(-shift): exp(-0.3) < 0.8 (low side), exp(0.3) > 1.2 (high side)
            hand["low"] += int((shift > 0).sum()) if reward < 0.5 else 0
            hand["high"] += int((shift < 0).sum()) if reward > 0.5 else 0
        groups.append(RolloutGroup(prompt_id=f"0:{g}", replica="0", policy_version=0,
                                   prompt_token_ids=prompt, samples=samples))
    env = init_distributed()
    steps = {}
    for mu in (1, 2):
        config = load_config(None, ['train.param_dtype="float32"', "train.optm_lr=1e-2",
                                    "rollout.n_generation=4", "train.train_batch_per_replica=12",
                                    "train.train_policy.mini_batch=5",
                                    f"train.train_policy.mu_iterations={mu}",
                                    f"rollout.sampling_config.temperature={temperature}"])
        trainer = GRPOTrainer(config, model_dir, env, build_mesh(parallel_dims(config), env.device), 4)
        steps[mu] = trainer.step(groups)
    json.dump({"hand": hand, "steps": steps}, open(out, "w"))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_grpo_step_reports_the_hand_computed_metrics(tmp_path, tiny_model_dir):
    """Rollout log-probs are the policy's own at the sampling temperature, shifted by +-0.3
    per token (every completion has both): the gap is 0.3, the ratios e^-0.3 and e^0.3, clipped where the advantage's
    sign says; entropy from a full forward of each row, by hand. With mu_iterations = 2 the
    gap is still the one before the step's first update."""
    script, out = tmp_path / "step.py", tmp_path / "out.json"
    script.write_text(STEP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    data = json.loads(out.read_text())
    hand, one, two = data["hand"], data["steps"]["1"], data["steps"]["2"]
    tokens = hand["tokens"]
    assert one["tokens"] == tokens
    assert one["logprob_gap_mean"] == pytest.approx(0.3, abs=1e-4)
    assert one["entropy"] == pytest.approx(hand["entropy"] / tokens, rel=1e-4)
    assert one["ratio_max"] == pytest.approx(math.exp(0.3), rel=1e-4)
    assert one["clip_low_fraction"] == pytest.approx(hand["low"] / tokens)
    assert one["clip_high_fraction"] == pytest.approx(hand["high"] / tokens)
    assert one["clip_fraction"] == pytest.approx((hand["low"] + hand["high"]) / tokens)
    assert hand["low"] > 0 and hand["high"] > 0
    parts = one["policy_forward_s"] + one["policy_backward_s"] + one["policy_optimizer_s"]
    assert all(one[k] > 0 for k in ("policy_forward_s", "policy_backward_s", "policy_optimizer_s"))
    assert parts <= one["policy_seconds"]
    assert two["logprob_gap_mean"] == pytest.approx(0.3, abs=1e-4)
    assert two["kl_behaviour"] != pytest.approx(one["kl_behaviour"])  # the last iteration's
