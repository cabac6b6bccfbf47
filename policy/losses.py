"""The pieces of the GRPO loss family, as pure tensor functions (formulas in docs/algorithms.md).

Shapes: per-token tensors are [B, T] (B completions, T positions; `mask` is 1 at the completion
tokens), per-sequence tensors [B]. `policy.grpo.grpo_loss` assembles them; each is tested
against hand-computed values in tests/test_losses.py.
"""

from __future__ import annotations

import torch

# exp() of a larger log-ratio overflows float32 long before it means anything (cosmos-rl clamps
# GSPO's sequence log-ratio at 10 for the same reason).
MAX_SEQUENCE_LOG_RATIO = 10.0


def normalised_advantages(
    rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages of rewards shaped [groups, samples per group]: r - mean(group), divided by
    std(group) + eps ("group", GRPO), by the std of all the batch's rewards + eps ("batch", as
    TRL's scale_rewards = "batch"), or not at all ("none": Dr.GRPO, cosmos-rl's
    unbiased_advantage). std is the unbiased (n-1) estimate; one reward alone has std 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "batch":
        flat = rewards.flatten()
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        return centred / (std + eps)
    if scale != "group":
        raise ValueError(f"advantage scale {scale!r}: use 'group', 'batch' or 'none'")
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred)
    return centred / (std + eps)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each row's masked tokens: [B, T] -> [B]; 0 for an empty row."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def importance_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, variant: str
) -> torch.Tensor:
    """pi / pi_old per token ("grpo": exp(logp - old)), or GSPO's sequence ratio
    s_i = exp(mean_t(logp_t - old_t)) broadcast to the row's tokens ("gspo"), with gradient
    through every token of the row. [B, T]."""
    log_ratio = logprobs - old_logprobs
    if variant != "gspo":
        return torch.exp(log_ratio)
    per_sequence = sequence_mean(log_ratio, mask).clamp(max=MAX_SEQUENCE_LOG_RATIO)
    return torch.exp(per_sequence).unsqueeze(1).expand_as(logprobs)


def policy_term(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    lower_bound_ratio: float | None = None,
    aipo_rho: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token policy-gradient loss and where dual clipping took it (bool, [B, T]).

    PPO: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A). Dual clip (Ye et al. 2020,
    cosmos-rl's lower_bound_ratio = c; None: off): where A < 0 the loss is at most -c A.
    AIPO (aipo_rho = rho, replaces both): -min(r, rho) A. advantages: [B, 1] or [B, T]."""
    if aipo_rho is not None:
        return -ratio.clamp(max=aipo_rho) * advantages, torch.zeros_like(ratio, dtype=torch.bool)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if lower_bound_ratio is None:
        return loss, torch.zeros_like(ratio, dtype=torch.bool)
    bound = (-lower_bound_ratio * advantages).expand_as(loss)
    dual = (advantages < 0) & (loss > bound)
    return torch.where(dual, bound, loss), dual


def behaviour_weight(
    proximal: torch.Tensor,
    behaviour: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float | None,
    floor: float | None = None,
    mode: str = "mask",
    level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoupled PPO's importance weight pi_prox / pi_behaviour (no gradient), per token
    exp(prox - behav), or per sequence the geometric mean exp(mean_t(prox - behav)) broadcast
    to its tokens. Beyond `cap` (above) or `floor` (below, mask mode only) a weight is set to 0
    ("mask": AReaL, cosmos-rl's behav_imp_weight_cap) or, above the cap, to the cap
    ("truncate": TIS). Returns (applied weight, raw weight, capped: bool), each [B, T]."""
    with torch.no_grad():
        log_weight = proximal - behaviour
        if level == "sequence":
            per_sequence = sequence_mean(log_weight, mask).clamp(max=MAX_SEQUENCE_LOG_RATIO)
            log_weight = per_sequence.unsqueeze(1).expand_as(proximal)
        raw = torch.exp(log_weight)
        above = raw > cap if cap is not None else torch.zeros_like(raw, dtype=torch.bool)
        below = raw < floor if floor is not None else torch.zeros_like(raw, dtype=torch.bool)
        if mode == "truncate":
            applied = raw.clamp(max=cap) if cap is not None else raw
            return applied, raw, above
        capped = above | below
        return raw.masked_fill(capped, 0.0), raw, capped


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3), with
    delta = log pi_ref - log pi: k1 = -delta, k2 = delta^2 / 2, k3 = exp(delta) - delta - 1."""
    delta = ref_logprobs - logprobs
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"KL estimator {estimator!r}: use 'k1', 'k2' or 'k3'")


def off_policy_sequence_mask(
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    delta: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence masking (cosmos-rl's off_policy_masking_delta): a
    row with A < 0 whose mean_t(log pi_old - log pi) exceeds delta is left out (0), [B]."""
    with torch.no_grad():
        drift = sequence_mean(old_logprobs - logprobs, mask)
        keep = (advantages >= 0) | (drift <= delta)
        return keep.to(logprobs.dtype)


def token_weights(
    mask: torch.Tensor, loss_type: str, max_tokens: int | None = None
) -> torch.Tensor:
    """Each token's weight in the loss's numerator, [B, T]; the denominator is
    `loss_units(mask, loss_type)` (or, for a part of a larger batch, the whole batch's).

    token-mean: 1 per token, over all tokens. seq-mean-token-sum: 1, over sequences.
    seq-mean-token-mean: 1 / |o_i|, over sequences; with max_tokens (Dr.GRPO, cosmos-rl's
    unbiased_loss_max_tokens) 1 / max_tokens instead, a constant normaliser."""
    if loss_type in ("token-mean", "seq-mean-token-sum"):
        return mask
    if loss_type != "seq-mean-token-mean":
        raise ValueError(f"loss_type {loss_type!r}: use token-mean, seq-mean-token-sum or "
                         "seq-mean-token-mean")  # fmt: skip
    if max_tokens:
        return mask / float(max_tokens)
    return mask / mask.sum(-1, keepdim=True).clamp(min=1.0)


def loss_units(mask: torch.Tensor, loss_type: str) -> float:
    """What a loss_type averages over: completion tokens (token-mean) or completions with at
    least one token (the seq-mean types; an empty row adds nothing to either side)."""
    if loss_type == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())
