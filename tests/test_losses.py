"""The GRPO loss family (policy/losses.py, policy/grpo.py) against values computed by hand:
advantage scales, GSPO's sequence ratio, dual clip, AIPO, decoupled PPO's truncated / masked
behaviour weights (per token and per sequence), KL estimators in the loss and in the reward,
the entropy bonus, positive-sample NLL and every loss aggregation; the edge cases (all-equal
groups, empty completions: no NaN); a batch split into micro-batches and ranks takes exactly
the gradient of the whole; the config keys parse and bad combinations are one line."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from gantry.config import load_config
from gantry.config.loader import ConfigError
from policy import step_metrics
from policy.grpo import grpo_loss
from policy.grpo_batch import advantages_for, gather_rows, kl_sums
from policy.losses import (
    behaviour_weight,
    importance_ratio,
    kl_estimate,
    normalised_advantages,
    off_policy_sequence_mask,
    policy_term,
    token_weights,
)
from policy.step_metrics import differentiable_entropy

PPO = {"epsilon_low": 0.2, "epsilon_high": 0.2}

# ---- advantages ------------------------------------------------------------------------------


def test_advantage_scales_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 3.0]])
    eps = 1e-4
    group0 = statistics.stdev([1, 0, 0, 1])
    batch = statistics.stdev([1, 0, 0, 1, 2, 2, 2, 3])
    got = normalised_advantages(rewards, "group", eps)
    a = 0.5 / (group0 + eps)
    assert got[0].tolist() == pytest.approx([a, -a, -a, a])
    got = normalised_advantages(rewards, "batch", eps)
    assert got[1].tolist() == pytest.approx([-0.25 / (batch + eps)] * 3 + [0.75 / (batch + eps)])
    got = normalised_advantages(rewards, "none")
    assert got.flatten().tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5] + [-0.25] * 3 + [0.75])
    with pytest.raises(ValueError, match="'group', 'batch' or 'none'"):
        normalised_advantages(rewards, "global")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_groups_and_single_samples_get_zero_advantages(scale):
    for rewards in (torch.full((2, 4), 3.0), torch.tensor([[1.0], [0.0]])):
        got = normalised_advantages(rewards, scale)
        assert torch.isfinite(got).all()
        if rewards.shape[1] > 1:
            assert got.abs().sum() == 0


def test_advantages_of_groups_of_different_sizes():
    got = advantages_for([1.0, 0.0, 3.0, 3.0, 0.0], [2, 3], "none")
    assert got == pytest.approx([0.5, -0.5, 1.0, 1.0, -2.0])
    batch = statistics.stdev([1.0, 0.0, 3.0, 3.0, 0.0])
    got = advantages_for([1.0, 0.0, 3.0, 3.0, 0.0], [2, 3], "batch", eps=0.0)
    assert got == pytest.approx([0.5 / batch, -0.5 / batch, 1 / batch, 1 / batch, -2 / batch])


# ---- ratios and policy terms ----------------------------------------------------------------


def test_gspo_sequence_ratio_hand_computed_with_gradient_through_every_token():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.2, 0.4, 9.0], [-0.3, 5.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ratio = importance_ratio(logp, old, mask, "gspo")
    assert ratio[0].tolist() == pytest.approx([math.exp(0.3)] * 3)
    assert ratio[1].tolist() == pytest.approx([math.exp(-0.3)] * 3)
    (ratio[:, 0]).sum().backward()
    # d s_i / d logp_it = s_i / |o_i| at the row's tokens, 0 at its padding.
    assert logp.grad[0].tolist() == pytest.approx([math.exp(0.3) / 2] * 2 + [0.0])
    assert logp.grad[1].tolist() == pytest.approx([math.exp(-0.3), 0.0, 0.0])
    # The token ratio is the plain one.
    token = importance_ratio(logp.detach(), old, mask, "grpo")
    assert token[0, :2].tolist() == pytest.approx([math.exp(0.2), math.exp(0.4)])


def test_gspo_loss_clips_the_sequence_ratio_at_the_papers_epsilons():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.2, 0.4], [-0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo_loss(
        logp, old, torch.tensor([1.0, -1.0]), mask, variant="gspo",
        epsilon_low=3e-4, epsilon_high=4e-4, lower_bound_ratio=3.0,
    )  # fmt: skip
    # row 0: s = e^0.3 > 1.0004, A > 0: -1.0004 per token; row 1: s = e^-0.3 < 0.9997, A < 0:
    # -min(-s, -0.9997) = 0.9997. Token mean over 3 tokens.
    assert loss.item() == pytest.approx((2 * -1.0004 + 0.9997) / 3, rel=1e-6)
    assert stats["clip_high_fraction"] == pytest.approx(2 / 3)
    assert stats["clip_low_fraction"] == pytest.approx(1 / 3)
    inside = torch.tensor([[1e-4, -1e-4]], requires_grad=True)
    loss, _ = grpo_loss(inside, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2),
                        variant="gspo", epsilon_low=3e-4, epsilon_high=4e-4)  # fmt: skip
    loss.backward()
    assert inside.grad[0].tolist() == pytest.approx([-0.5, -0.5])  # -s / |o| / 2 tokens, s = 1


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    ratio = torch.tensor([[4.0, 2.0, 4.0]], requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, dual = policy_term(ratio, adv, **PPO, lower_bound_ratio=3.0)
    # PPO alone: 4, 2, -1.2; the dual clip bounds the first at 3 (no gradient there).
    assert loss[0].tolist() == pytest.approx([3.0, 2.0, -1.2])
    assert dual[0].tolist() == [True, False, False]
    loss.sum().backward()
    assert ratio.grad[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    plain, none = policy_term(ratio.detach(), adv, **PPO)
    assert plain[0].tolist() == pytest.approx([4.0, 2.0, -1.2]) and not none.any()


def test_aipo_caps_the_ratio_on_one_side_only():
    ratio = torch.tensor([[3.0, 3.0, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, _ = policy_term(ratio, adv, **PPO, lower_bound_ratio=3.0, aipo_rho=2.0)
    assert loss[0].tolist() == pytest.approx([-2.0, 2.0, -0.5])
    _, stats = grpo_loss(ratio.log(), torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3),
                         aipo_rho=2.0, **PPO)  # fmt: skip
    assert stats["clip_high_fraction"] == pytest.approx(2 / 3)  # ratios above rho


# ---- decoupled PPO: behaviour weights --------------------------------------------------------


def test_behaviour_weights_masked_truncated_and_per_sequence():
    behaviour = torch.zeros(1, 3)
    proximal = torch.tensor([[math.log(3.0), math.log(0.5), 0.0]])
    mask = torch.ones(1, 3)
    applied, raw, capped = behaviour_weight(proximal, behaviour, mask, cap=2.0)
    assert raw[0].tolist() == pytest.approx([3.0, 0.5, 1.0])
    assert applied[0].tolist() == pytest.approx([0.0, 0.5, 1.0])  # mask: above the cap is 0
    assert capped[0].tolist() == [True, False, False]
    applied, _, capped = behaviour_weight(proximal, behaviour, mask, cap=2.0, mode="truncate")
    assert applied[0].tolist() == pytest.approx([2.0, 0.5, 1.0])  # TIS: min(w, cap)
    applied, _, capped = behaviour_weight(proximal, behaviour, mask, cap=2.0, floor=0.6)
    assert applied[0].tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert capped[0].tolist() == [True, True, False]
    # Per sequence: the geometric mean (3 * 0.5 * 1)^(1/3), one weight for the whole row.
    geo = 1.5 ** (1 / 3)
    applied, raw, _ = behaviour_weight(proximal, behaviour, mask, cap=2.0, level="sequence")
    assert applied[0].tolist() == pytest.approx([geo] * 3)
    applied, _, capped = behaviour_weight(proximal, behaviour, mask, cap=1.1, level="sequence")
    assert applied.abs().sum() == 0 and capped.all()


def test_decoupled_loss_weights_each_token_and_reports_the_weight():
    logp = torch.tensor([[-1.0, -1.0]])
    behaviour = torch.tensor([[-1.0 - math.log(2.0), -1.0 + math.log(4.0)]])  # w = 2, 0.25
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    expected = {None: -(2 + 0.25) / 2, "mask": -(0 + 0.25) / 2, "truncate": -(1.5 + 0.25) / 2}
    for mode, value in expected.items():
        options = (
            {} if mode is None else {"behav_imp_weight_cap": 1.5, "behav_imp_weight_mode": mode}
        )
        loss, stats = grpo_loss(
            logp, logp.clone(), adv, mask, behaviour_logprobs=behaviour, **PPO, **options
        )
        assert loss.item() == pytest.approx(value), mode
        assert stats["behav_imp_weight_mean"] == pytest.approx(1.125)
        assert stats["behav_imp_weight_max"] == pytest.approx(2.0)
        assert stats["behav_imp_weight_capped_fraction"] == (0.0 if mode is None else 0.5)
        # The ratio is against the proximal policy (1 here); the gap against the engine's.
        assert stats["ratio_mean"] == pytest.approx(1.0)
        assert stats["logprob_gap"] == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_off_policy_sequence_masking_drops_drifted_negative_rows():
    behaviour = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-0.1, -0.1]])  # drift 1, 1, 0.1
    keep = off_policy_sequence_mask(behaviour, logp, torch.tensor([-1.0, 1.0, -1.0]),
                                    torch.ones(3, 2), delta=0.5)  # fmt: skip
    assert keep.tolist() == [0.0, 1.0, 1.0]


# ---- KL, entropy, NLL ------------------------------------------------------------------------


def test_kl_estimators_hand_computed_in_the_loss_and_out_of_it():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])  # delta = -0.5
    expected = {"k1": 0.5, "k2": 0.125, "k3": math.exp(-0.5) + 0.5 - 1.0}
    for name, value in expected.items():
        assert kl_estimate(logp, ref, name).item() == pytest.approx(value)
        loss, stats = grpo_loss(logp, logp.clone(), torch.zeros(1), torch.ones(1, 1),
                                ref_logprobs=ref, kl_beta=0.1, kl_estimator=name, **PPO)  # fmt: skip
        assert loss.item() == pytest.approx(0.1 * value) and stats["kl"] == pytest.approx(value)
    # In the reward instead: reported, not in the loss.
    loss, stats = grpo_loss(logp, logp.clone(), torch.zeros(1), torch.ones(1, 1), ref_logprobs=ref,
                            kl_beta=0.1, use_kl_in_reward=True, **PPO)  # fmt: skip
    assert loss.item() == 0.0 and stats["kl"] == pytest.approx(expected["k3"])
    # DeepSeek-V3.2's unbiased estimate: times pi / pi_old = 2.
    loss, _ = grpo_loss(logp, logp - math.log(2.0), torch.zeros(1), torch.ones(1, 1),
                        ref_logprobs=ref, kl_beta=0.1, unbiased_kl_estimate=True, **PPO)  # fmt: skip
    assert loss.item() == pytest.approx(0.1 * 2 * expected["k3"])
    with pytest.raises(ValueError, match="'k1', 'k2' or 'k3'"):
        kl_estimate(logp, ref, "k4")


def test_kl_in_reward_sums_each_rows_estimate_and_ranks_fill_all_rows():
    behaviour = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, 7.0]])
    sums = kl_sums(behaviour, ref, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "k1")
    assert sums.tolist() == pytest.approx([0.5, 0.0])
    # Two ranks' shares, summed (the all-reduce) into the order of all four rows.
    parts = [gather_rows(torch.tensor([1.0, 2.0]), 0, 4, lambda t: t),
             gather_rows(torch.tensor([3.0, 4.0]), 2, 4, lambda t: t)]  # fmt: skip
    assert (parts[0] + parts[1]).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_entropy_bonus_and_positive_nll_hand_computed():
    entropy = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss, _ = grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2),
                        entropy=entropy, entropy_coeff=0.1, **PPO)  # fmt: skip
    assert loss.item() == pytest.approx(-0.15)
    loss.backward()
    assert entropy.grad[0].tolist() == pytest.approx([-0.05, -0.05])
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    loss, _ = grpo_loss(logp, logp.clone(), torch.zeros(2), torch.ones(2, 2),
                        positive=torch.tensor([True, False]), positive_nll_coef=0.5, **PPO)  # fmt: skip
    assert loss.item() == pytest.approx(0.5 * (1 + 2) / 2)


def test_differentiable_entropy_matches_autograd_in_chunks_and_with_banned_tokens(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, 9, generator=gen)
    logits[..., 2] = float("-inf")  # a banned token: p = 0
    weights = torch.randn(5, 4, generator=gen)

    def grad_of(fn):
        z = logits.clone().requires_grad_(True)
        (fn(torch.log_softmax(z, -1)) * weights).sum().backward()
        return z.grad

    def direct(logprobs):
        p = logprobs.exp()
        return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)

    monkeypatch.setitem(step_metrics.ENTROPY_CHUNK_ELEMENTS, "cpu", 20)  # chunks of 2 rows
    ours = differentiable_entropy(torch.log_softmax(logits, -1))
    assert torch.allclose(ours, direct(torch.log_softmax(logits, -1)), atol=1e-6)
    got, want = grad_of(differentiable_entropy), grad_of(direct)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-6)


# ---- aggregation -----------------------------------------------------------------------------

# Rows: 3 tokens of loss 1 (A = -1), 1 token of loss 2 (A = -2), an empty completion (A = 5).
ROWS_ADV = torch.tensor([-1.0, -2.0, 5.0])
ROWS_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
AGGREGATES = {
    ("token-mean", None): (3 + 2) / 4,
    ("seq-mean-token-sum", None): (3 + 2) / 2,  # the empty row is no sequence
    ("seq-mean-token-mean", None): (1 + 2) / 2,
    ("seq-mean-token-mean", 4): (3 / 4 + 2 / 4) / 2,  # Dr.GRPO: a constant normaliser
}


@pytest.mark.parametrize(("loss_type", "max_tokens"), list(AGGREGATES))
def test_each_loss_aggregation_hand_computed(loss_type, max_tokens):
    logp = torch.zeros(3, 3)  # ratio 1: the per-token loss is -A
    loss, _ = grpo_loss(logp, logp.clone(), ROWS_ADV, ROWS_MASK, loss_type=loss_type,
                        unbiased_loss_max_tokens=max_tokens, **PPO)  # fmt: skip
    assert loss.item() == pytest.approx(AGGREGATES[(loss_type, max_tokens)])
    with pytest.raises(ValueError, match="loss_type 'token-sum'"):
        token_weights(ROWS_MASK, "token-sum")


EVERYTHING = {
    "variant": "gspo", "entropy_coeff": 0.05, "positive_nll_coef": 0.3, "kl_beta": 0.2,
    "lower_bound_ratio": 3.0, "behav_imp_weight_cap": 1.2, "behav_imp_weight_mode": "truncate",
    "epsilon_low": 0.2, "epsilon_high": 0.28,
}  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{"loss_type": t} for t in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")]
    + [{"loss_type": "seq-mean-token-mean", "unbiased_loss_max_tokens": 6}]
    + [{"loss_type": t, **EVERYTHING} for t in ("token-mean", "seq-mean-token-mean")],
)
def test_micro_batches_and_ranks_take_the_gradient_of_the_whole_batch(options):
    """One pass over 6 rows against 3 micro-batches and against 2 ranks (gradients averaged,
    as FSDP does), each part dividing by the whole batch's units (policy.trainer)."""
    gen = torch.Generator().manual_seed(7)
    rows, length = 6, 5
    lengths = torch.tensor([5, 0, 3, 1, 4, 2])  # an empty completion included
    mask = (torch.arange(length) < lengths.unsqueeze(1)).float()
    old = -torch.rand(rows, length, generator=gen) * 3
    logp = (old + torch.randn(rows, length, generator=gen) * 0.3).requires_grad_(True)
    entropy = torch.rand(rows, length, generator=gen).requires_grad_(True)
    ref, behaviour = old - 0.2, old + torch.randn(rows, length, generator=gen) * 0.2
    adv, positive = torch.randn(rows, generator=gen), torch.rand(rows, generator=gen) > 0.5
    kinds = {"ref_logprobs": ref, "behaviour_logprobs": behaviour}

    def loss_of(part, normalizer=None, positive_normalizer=None):
        extra = {k: v[part] for k, v in kinds.items()}
        return grpo_loss(logp[part], old[part], adv[part], mask[part], entropy=entropy[part],
                         positive=positive[part], normalizer=normalizer,
                         positive_normalizer=positive_normalizer, **extra, **options)[0]  # fmt: skip

    def grads():
        return logp.grad.clone(), torch.zeros(0) if entropy.grad is None else entropy.grad.clone()

    loss_of(slice(0, rows)).backward()
    whole = grads()
    units = (
        float(mask.sum()) if options["loss_type"] == "token-mean" else float((lengths > 0).sum())
    )
    chosen = float((mask * positive.unsqueeze(1)).sum())
    for world, parts in ((1, [slice(0, 2), slice(2, 4), slice(4, 6)]),
                         (2, [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 6)])):  # fmt: skip
        logp.grad, entropy.grad = None, None
        for part in parts:
            # each rank divides by its share; FSDP averages the ranks' gradients (1 / world)
            (loss_of(part, units / world, chosen / world) / world).backward()
        got = grads()
        assert torch.allclose(got[0], whole[0], atol=1e-6), world
        assert torch.allclose(got[1], whole[1], atol=1e-6), world
        assert torch.isfinite(logp.grad).all()


@pytest.mark.parametrize(
    "options",
    [{"loss_type": t} for t in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")]
    + [{**EVERYTHING, "behav_imp_weight_level": "sequence"}, {"aipo_rho": 2.0}],
)
def test_empty_completions_give_a_zero_loss_not_nan(options):
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    loss, stats = grpo_loss(
        logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, ref_logprobs=torch.zeros(2, 3),
        behaviour_logprobs=torch.zeros(2, 3), entropy=torch.zeros(2, 3),
        positive=torch.tensor([True, True]), **{**PPO, **options},
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.values())


# ---- config ----------------------------------------------------------------------------------


def test_the_loss_keys_parse_under_cosmos_rl_names():
    config = load_config(None, [
        'train.train_policy.variant="gspo"', 'train.train_policy.loss_type="seq-mean-token-mean"',
        "train.train_policy.unbiased_loss_max_tokens=4096", "train.train_policy.unbiased_advantage=true",
        "train.train_policy.aipo_rho=4.0", "train.train_policy.positive_nll_coef=0.1",
        "train.train_policy.lower_bound_ratio=5.0", "train.train_policy.entropy_coeff=0.01",
        "train.train_policy.use_decoupled_loss=true", "train.train_policy.behav_imp_weight_cap=2.0",
        'train.train_policy.behav_imp_weight_mode="truncate"', 'train.train_policy.kl_estimator="k2"',
        "train.train_policy.off_policy_masking_delta=0.5",
    ])  # fmt: skip
    policy = config.train.train_policy
    assert (policy.variant, policy.unbiased_loss_max_tokens, policy.aipo_rho) == ("gspo", 4096, 4.0)
    # GSPO takes the paper's clip range unless given one.
    assert (policy.epsilon_low, policy.epsilon_high) == (3e-4, 4e-4)
    given = load_config(
        None, ['train.train_policy.variant="gspo"', "train.train_policy.epsilon_high=0.01"]
    )
    assert given.train.train_policy.epsilon_high == 0.01
    assert given.train.train_policy.epsilon_low == 3e-4
    default = load_config(None, []).train.train_policy
    assert (default.epsilon_low, default.lower_bound_ratio, default.loss_type) == (
        0.2,
        3.0,
        "token-mean",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.train_policy.unbiased_loss_max_tokens=4096"],
         "unbiased_loss_max_tokens needs loss_type = 'seq-mean-token-mean'"),
        (["train.train_policy.behav_imp_weight_cap=2.0"],
         "behav_imp_weight_cap needs use_decoupled_loss = true"),
        (["train.train_policy.use_decoupled_loss=true", "train.train_policy.behav_imp_weight_floor=0.5",
          'train.train_policy.behav_imp_weight_mode="truncate"'],
         "behav_imp_weight_floor applies to behav_imp_weight_mode = 'mask' only"),
        (["train.train_policy.unbiased_advantage=true", 'train.train_policy.scale_rewards="batch"'],
         "unbiased_advantage = true divides by no std"),
        (['train.train_policy.loss_type="token-sum"'], "loss_type"),
        (["train.train_policy.lower_bound_ratio=0.5"], "lower_bound_ratio"),
    ],
)  # fmt: skip
def test_bad_loss_settings_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides)
    (problem,) = excinfo.value.problems
    assert message in problem and "\n" not in problem


# ---- through the trainer and the launcher -----------------------------------------------------

VARIANT = [
    'train.train_policy.variant="gspo"', 'train.train_policy.loss_type="seq-mean-token-mean"',
    "train.train_policy.entropy_coeff=0.01", "train.train_policy.positive_nll_coef=0.1",
    # The script's rollout log-probs are random, above the policy's: weights of 0.005 to 0.3,
    # a floor of 0.05 masks some.
    "train.train_policy.use_decoupled_loss=true", "train.train_policy.behav_imp_weight_cap=1.5",
    "train.train_policy.behav_imp_weight_floor=0.05", "train.train_policy.kl_beta=0.05",
    "train.train_policy.use_kl_in_reward=true", 'train.train_policy.scale_rewards="batch"',
    "train.train_policy.mu_iterations=2",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(600)
def test_a_variant_step_on_two_ranks_matches_one_process(tmp_path, tiny_model_dir):
    """Every batch-wide quantity of a non-default loss (sequence counts, positive-sample tokens,
    batch std, KL in the reward gathered from both ranks, proximal log-probs kept for the
    second pass) is the same whether the batch is one micro-batch of one process or
    micro-batches of 5 on two FSDP2 ranks."""
    from tests.test_policy_parallel import _run

    single, single_w = _run(tmp_path, tiny_model_dir, "single", 1, *VARIANT,
                            "train.train_policy.mini_batch=24")  # fmt: skip
    split, split_w = _run(tmp_path, tiny_model_dir, "fsdp2", 2, *VARIANT,
                          "policy.parallelism.dp_shard_size=2", "train.train_policy.mini_batch=5")  # fmt: skip
    for a, b in zip(single, split, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for key in ("ratio_mean", "ratio_max", "kl_ref", "entropy", "behav_imp_weight_mean",
                    "behav_imp_weight_max", "behav_imp_weight_capped_fraction"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert a["behav_imp_weight_capped_fraction"] > 0 and a["kl_ref"] > 0
    for key, value in single_w.items():
        assert torch.allclose(split_w[key], value, atol=1e-4), key


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_a_gspo_tis_entropy_run_through_the_launcher(tmp_path):
    """The quickstart with GSPO, the decoupled loss with truncated importance weights and an
    entropy bonus: the run finishes and metrics.jsonl carries the variant's metrics."""
    from tests.test_end_to_end import run_launcher

    _, run_dir, outcome = run_launcher(
        tmp_path, "rollout.backend=transformers", "train.max_num_steps=3",
        "train.train_batch_per_replica=128", 'train.train_policy.variant="gspo"',
        "train.train_policy.use_decoupled_loss=true", "train.train_policy.behav_imp_weight_cap=2.0",
        'train.train_policy.behav_imp_weight_mode="truncate"',
        "train.train_policy.entropy_coeff=0.01", timeout=430,
    )  # fmt: skip
    assert outcome["steps"] == 3
    config = json.loads((run_dir / "config.json").read_text())["train"]["train_policy"]
    # The quickstart's file sets epsilon_low/high: a value given is kept under GSPO too.
    assert config["variant"] == "gspo" and config["epsilon_high"] == 0.2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # Step 1 trains on rollouts of its own weights: the transformers engine's log-probs are the
    # policy's to float noise, so every weight is 1; later steps may train on staler rollouts.
    assert metrics[0]["behav_imp_weight_max"] == pytest.approx(1.0, abs=1e-3)
    assert metrics[0]["behav_imp_weight_capped_fraction"] == 0.0
    for m in metrics:
        assert 0.5 < m["behav_imp_weight_mean"] < 2.0
        assert 0 <= m["behav_imp_weight_capped_fraction"] < 1
        # The first pass's ratio is against its own log-probs (the proximal policy): 1.
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert m["entropy"] > 0 and math.isfinite(m["loss"])
