"""GRPO advantages and loss against values computed by hand."""

import math

import pytest
import torch

from policy.grpo import group_advantages, grpo_loss


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-4)
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    std = math.sqrt(((0.5**2) * 4) / 3)
    expected0 = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    assert adv[0].tolist() == pytest.approx(
        [expected0[0], expected0[1], expected0[1], expected0[0]]
    )
    # a group with equal rewards carries no signal
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_grpo_loss_on_policy_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss(logp, logp.clone(), adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    # ratio 1 everywhere: per-token loss = -A; token mean over 3 tokens: -(2 + 2 - 1) / 3
    assert loss.item() == pytest.approx(-1.0)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_fraction"] == 0.0
    assert stats["kl_behaviour"] == pytest.approx(0.0)


def test_grpo_loss_clipping_hand_computed():
    behaviour = torch.zeros(1, 3)
    # ratios e^0.5 = 1.6487 (clipped to 1.2 for A>0), e^-0.5 = 0.6065, 1.0
    logp = torch.tensor([[0.5, -0.5, 0.0]])
    mask = torch.ones(1, 3)
    loss, stats = grpo_loss(
        logp, behaviour, torch.tensor([1.0]), mask, epsilon_low=0.2, epsilon_high=0.2
    )
    # A = +1: min(r, clip(r)) = [1.2, 0.6065, 1.0]
    expected = -(1.2 + math.exp(-0.5) + 1.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    loss_neg, _ = grpo_loss(
        logp, behaviour, torch.tensor([-1.0]), mask, epsilon_low=0.2, epsilon_high=0.3
    )
    # A = -1: min(-r, -clip(r)) = [-1.6487, -0.8, -1.0] -> loss = mean of [1.6487, 0.8, 1.0]
    assert loss_neg.item() == pytest.approx((math.exp(0.5) + 0.8 + 1.0) / 3, rel=1e-6)


def test_grpo_loss_gradient_only_through_unclipped_tokens():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, _ = grpo_loss(
        logp,
        torch.zeros(1, 2),
        torch.tensor([1.0]),
        torch.ones(1, 2),
        epsilon_low=0.2,
        epsilon_high=0.2,
    )
    loss.backward()
    # clipped token: no gradient; unclipped token (ratio 1): d(-r/2)/dlogp = -1/2
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5])


def test_kl_penalty_k3_hand_computed():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    loss, stats = grpo_loss(
        logp,
        logp.clone(),
        torch.tensor([0.0]),
        torch.ones(1, 1),
        epsilon_low=0.2,
        epsilon_high=0.2,
        kl_beta=0.1,
        ref_logprobs=ref,
    )
    kl = math.exp(-0.5) + 0.5 - 1.0
    assert stats["kl"] == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(
            logp,
            logp,
            torch.tensor([0.0]),
            torch.ones(1, 1),
            epsilon_low=0.2,
            epsilon_high=0.2,
            kl_beta=0.1,
        )


def test_rows_of_take_the_configured_advantage_scale_and_keep_rewards():
    from gantry.comm.protocol import RolloutGroup, Sample
    from gantry.config import load_config
    from policy.trainer import advantage_scale, pack_rows, rows_of

    def group(pid, rewards):
        samples = [Sample(token_ids=[5, 6], logprobs=[-1.0, -1.0], reward=r, finish_reason="stop")
                   for r in rewards]  # fmt: skip
        return RolloutGroup(prompt_id=pid, replica="0", policy_version=0, prompt_token_ids=[1, 2],
                            samples=samples)  # fmt: skip

    groups = [group("0:1", [2.0, 2.0]), group("0:0", [1.0, 0.0])]  # sorted by prompt id
    none = rows_of(groups, "none")
    assert [r.advantage for r in none] == [0.5, -0.5, 0.0, 0.0]
    assert [r.reward for r in none] == [1.0, 0.0, 2.0, 2.0]
    batch_std = torch.tensor([1.0, 0.0, 2.0, 2.0]).std().item()
    batch = rows_of(groups, "batch")
    assert [r.advantage for r in batch] == pytest.approx([0.5 / (batch_std + 1e-4),
                                                          -0.5 / (batch_std + 1e-4), 0.0, 0.0])  # fmt: skip
    packed = pack_rows(none, pad_token_id=0, device=torch.device("cpu"))
    assert packed.rewards.tolist() == [1.0, 0.0, 2.0, 2.0]
    policy = load_config(None, ["train.train_policy.unbiased_advantage=true"]).train.train_policy
    assert advantage_scale(policy) == "none"
    policy = load_config(None, ['train.train_policy.scale_rewards="batch"']).train.train_policy
    assert advantage_scale(policy) == "batch"


def test_shared_prefixes_with_different_rewards_leave_the_loss():
    """cosmos-rl's min_filter_prefix_tokens, on hand-made groups: the maximal shared prefix of
    completions that disagree is masked, unless it is the whole completion (end token aside)."""
    from gantry.comm.protocol import RolloutGroup, Sample
    from policy.grpo_batch import shared_prefix_ignores
    from policy.trainer import pack_rows, rows_of

    eos = frozenset({9})
    completions = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 7], [1, 2, 3, 9], [6]]
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0]
    # [1,2,3] is shared by 0, 1, 3 (rewards differ): masked for 0 and 1; 3 is [1,2,3]+eos.
    assert shared_prefix_ignores(completions, rewards, 2, eos) == [3, 3, 0, 0, 0]
    assert shared_prefix_ignores(completions, rewards, 4, eos) == [0] * 5  # too short a prefix
    assert shared_prefix_ignores(completions, rewards, None, eos) == [0] * 5
    assert shared_prefix_ignores(completions, [1.0] * 5, 1, eos) == [0] * 5  # no signal
    # Members of a shared prefix that agree keep it, whatever the rest of the group got.
    assert shared_prefix_ignores([[1, 2, 3], [1, 2, 4], [5]], [1.0, 1.0, 0.0], 1) == [0, 0, 0]

    samples = [
        Sample(token_ids=t, logprobs=[0.0] * len(t), reward=r, finish_reason="stop")
        for t, r in zip(completions[:2], rewards[:2], strict=True)
    ]
    group = RolloutGroup(
        prompt_id="0:0", replica="0", policy_version=0, prompt_token_ids=[8, 8], samples=samples
    )
    rows = rows_of([group], "none", 2, eos)
    assert [r.ignore_prefix for r in rows] == [3, 3]
    packed = pack_rows(rows, pad_token_id=0, device=torch.device("cpu"))
    # Prompt of 2: completion tokens sit at positions 1..4; the first three are left out.
    assert packed.completion_mask.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]
