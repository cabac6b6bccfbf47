"""GRPO: group-normalised advantages and the policy loss of the GRPO family (PPO clip with
dual clip, GSPO, AIPO, decoupled PPO with truncated or masked importance weights, KL to a
reference, entropy bonus, positive-sample NLL), aggregated by `loss_type`.

Pure tensor functions, tested against hand-computed values in tests/test_grpo.py and
tests/test_losses.py; the formulas are in docs/algorithms.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from policy.losses import (
    behaviour_weight,
    importance_ratio,
    kl_estimate,
    normalised_advantages,
    off_policy_sequence_mask,
    policy_term,
    token_weights,
)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean(group)) / (std(group) + eps) for rewards shaped [groups, samples per group].

    std is the unbiased (n-1) estimate, as in TRL and cosmos-rl. A group whose samples all
    got the same reward gets zero advantages: it carries no signal about which is better.
    """
    return normalised_advantages(rewards, "group", eps)


@dataclass(frozen=True)
class LossSettings:
    """The loss's options: the `[train.train_policy]` fields of the same names."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    variant: str = "grpo"
    lower_bound_ratio: float | None = None
    aipo_rho: float | None = None
    loss_type: str = "token-mean"
    unbiased_loss_max_tokens: int | None = None
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    unbiased_kl_estimate: bool = False
    use_kl_in_reward: bool = False
    entropy_coeff: float = 0.0
    positive_nll_coef: float | None = None
    behav_imp_weight_cap: float | None = None
    behav_imp_weight_floor: float | None = None
    behav_imp_weight_mode: str = "mask"
    behav_imp_weight_level: str = "token"
    off_policy_masking_delta: float | None = None

    @classmethod
    def of(cls, train_policy) -> LossSettings:
        """From a TrainPolicyConfig (the fields of the same names)."""
        return cls(**{f.name: getattr(train_policy, f.name) for f in fields(cls)})


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    positive: torch.Tensor | None = None,
    normalizer: float | None = None,
    positive_normalizer: float | None = None,
    **settings,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO-family loss of a batch and its statistics (token means over this batch).

    logprobs (with gradient), old_logprobs (the ratio's denominator: the behaviour policy's, or
    with decoupled PPO the proximal policy's), ref_logprobs, behaviour_logprobs (decoupled PPO:
    the rollout engine's), entropy (with gradient, for the entropy bonus), mask: [B, T];
    advantages: [B]; positive: [B] bool (reward > 0, for positive_nll_coef). `settings` are
    LossSettings' fields. `normalizer` replaces this batch's loss units (tokens or sequences,
    by loss_type) as the denominator, and `positive_normalizer` its positive-sample tokens, for
    a batch that is one part of a larger one (micro-batches, data-parallel ranks).
    """
    opts = LossSettings(**settings)
    mask = mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(1)
    decoupled = behaviour_logprobs is not None
    behaviour = behaviour_logprobs if decoupled else old_logprobs
    ratio = importance_ratio(logprobs, old_logprobs, mask, opts.variant)
    per_token, dual = policy_term(
        ratio, adv, epsilon_low=opts.epsilon_low, epsilon_high=opts.epsilon_high,
        lower_bound_ratio=None if opts.variant == "gspo" else opts.lower_bound_ratio,
        aipo_rho=opts.aipo_rho,
    )  # fmt: skip
    stats: dict[str, float] = {}
    per_token = per_token * _corrections(
        opts, logprobs, old_logprobs, behaviour_logprobs, advantages, mask, stats
    )
    weights = token_weights(mask, opts.loss_type, opts.unbiased_loss_max_tokens)
    denominator = normalizer if normalizer is not None else _units(mask, opts.loss_type)
    loss = (per_token * weights).sum() / denominator
    loss = (
        loss + _penalties(opts, logprobs, old_logprobs, ref_logprobs, weights, stats) / denominator
    )
    if entropy is not None and opts.entropy_coeff > 0.0:
        loss = loss - opts.entropy_coeff * (entropy * weights).sum() / denominator
    if positive is not None and opts.positive_nll_coef:
        loss = loss + opts.positive_nll_coef * _positive_nll(
            logprobs, mask, positive, positive_normalizer
        )
    with torch.no_grad():
        stats.update(_behaviour_statistics(logprobs, behaviour, mask))
        if opts.aipo_rho is None:
            bounds = (opts.epsilon_low, opts.epsilon_high)
            stats.update(ratio_statistics(ratio, adv, mask, *bounds))
        else:  # AIPO's cap stops the gradient above rho whatever the advantage's sign.
            stats.update(ratio_statistics(ratio, adv.abs(), mask, 1.0, opts.aipo_rho - 1.0))
        stats["dual_clip_fraction"] = float((dual * mask).sum() / mask.sum().clamp(min=1.0))
    return loss, stats


def _corrections(
    opts: LossSettings,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    stats: dict[str, float],
) -> torch.Tensor:
    """Each token's factor (no gradient): decoupled PPO's behaviour weight pi_prox / pi_b
    (capped; its statistics into `stats`) and off-policy sequence masking; [B, T] or 1."""
    factor = torch.ones_like(mask)
    behaviour = old_logprobs
    if behaviour_logprobs is not None:
        behaviour = behaviour_logprobs
        weight, raw, capped = behaviour_weight(
            old_logprobs, behaviour, mask, cap=opts.behav_imp_weight_cap,
            floor=opts.behav_imp_weight_floor, mode=opts.behav_imp_weight_mode,
            level=opts.behav_imp_weight_level,
        )  # fmt: skip
        factor = factor * weight
        stats.update(weight_statistics(raw, capped, mask))
    if opts.off_policy_masking_delta is not None:
        keep = off_policy_sequence_mask(
            behaviour, logprobs, advantages, mask, opts.off_policy_masking_delta
        )
        factor = factor * keep.unsqueeze(1)
    return factor


def _positive_nll(
    logprobs: torch.Tensor, mask: torch.Tensor, positive: torch.Tensor, count: float | None
) -> torch.Tensor:
    """VAPO's positive-example LM loss: -log pi summed over the tokens of completions with a
    reward > 0, divided by `count` (the step's such tokens; default: this batch's)."""
    chosen = mask * positive.to(mask.dtype).unsqueeze(1)
    count = float(chosen.sum()) if count is None else count
    return (-logprobs * chosen).sum() / max(count, 1.0)


def _units(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """This batch's loss units (see policy.losses.loss_units), at least 1."""
    if loss_type == "token-mean":
        return mask.sum().clamp(min=1.0)
    return (mask.sum(-1) > 0).sum().to(mask.dtype).clamp(min=1.0)


def _penalties(
    opts: LossSettings,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    stats: dict[str, float],
) -> torch.Tensor:
    """kl_beta x the weighted sum of the KL estimate to the reference (in the loss unless
    use_kl_in_reward); with unbiased_kl_estimate each token's estimate is multiplied by
    pi / pi_old (DeepSeek-V3.2). Records the KL's token mean in stats["kl"]."""
    if opts.kl_beta <= 0.0:
        return logprobs.new_zeros(())
    if ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs")
    kl = kl_estimate(logprobs, ref_logprobs, opts.kl_estimator)
    mask = (weights > 0).to(logprobs.dtype)
    stats["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
    if opts.use_kl_in_reward:
        return logprobs.new_zeros(())
    if opts.unbiased_kl_estimate:
        kl = torch.exp(logprobs - old_logprobs) * kl
    return opts.kl_beta * (kl * weights).sum()


def _behaviour_statistics(
    logprobs: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    tokens = mask.sum().clamp(min=1.0)
    back = behaviour - logprobs
    return {
        # How far the weights moved from those that sampled the batch (k3 estimator).
        "kl_behaviour": float(((torch.exp(back) - back - 1.0) * mask).sum() / tokens),
        # The rollout engine's log-probs against the policy's on the same tokens.
        "logprob_gap": float((back.abs() * mask).sum() / tokens),
    }


def weight_statistics(raw: torch.Tensor, capped: torch.Tensor, mask: torch.Tensor) -> dict:
    """Decoupled PPO's behaviour importance weight before its cap: token mean and max over the
    masked tokens, and the fraction of tokens it truncated or masked."""
    tokens = mask.sum().clamp(min=1.0)
    return {
        "behav_imp_weight_mean": float((raw * mask).sum() / tokens),
        # Weights are positive: masked positions as 0 never win the max.
        "behav_imp_weight_max": float((raw * mask).max()) if mask.numel() else 0.0,
        "behav_imp_weight_capped_fraction": float((capped * mask).sum() / tokens),
    }


def ratio_statistics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, float]:
    """The importance ratio's mean and max over the masked tokens, and the fractions of tokens
    whose clipped term the loss takes (no gradient flows through them): below
    1 - epsilon_low with a negative advantage (low), above 1 + epsilon_high with a positive one
    (high), and both together (clip_fraction), as TRL counts them.

    ratio, mask: [B, T]; advantages: [B, 1] or [B, T]."""
    mask = mask.to(ratio.dtype)
    tokens = mask.sum().clamp(min=1.0)
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).to(ratio.dtype) * mask
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).to(ratio.dtype) * mask
    return {
        "ratio_mean": float((ratio * mask).sum() / tokens),
        # Ratios are positive: masked positions as 0 never win the max.
        "ratio_max": float((ratio * mask).max()) if mask.numel() else 0.0,
        "clip_fraction": float((low + high).sum() / tokens),
        "clip_low_fraction": float(low.sum() / tokens),
        "clip_high_fraction": float(high.sum() / tokens),
    }
