"""A GRPO step's batch-wide quantities, the same on every policy rank: advantages from the
rewards of all groups (normalised per group, by the batch's std, or not at all), the KL
penalty moved into the rewards (use_kl_in_reward), and the loss's global denominators.

Every rank holds all the step's rows (policy.trainer.rows_of) but computes log-probs for its
own share only: what needs every row's log-probs is summed over ranks here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from policy.losses import kl_estimate, loss_units, normalised_advantages


def advantages_for(
    rewards: Sequence[float], group_sizes: Sequence[int], scale: str, eps: float = 1e-4
) -> list[float]:
    """Advantages of rewards laid out group after group (`group_sizes`): r - mean(group),
    divided by the group's std ("group"), the std of all the rewards ("batch") or nothing
    ("none"); see policy.losses.normalised_advantages."""
    values = torch.tensor(list(rewards), dtype=torch.float32)
    batch_std = values.std() if values.numel() > 1 else torch.tensor(0.0)
    out, start = [], 0
    for size in group_sizes:
        group = values[start : start + size].unsqueeze(0)
        start += size
        if scale == "batch":
            out.append((group - group.mean()) / (batch_std + eps))
        else:
            out.append(normalised_advantages(group, scale, eps))
    return torch.cat(out, dim=1).squeeze(0).tolist() if out else []


def kl_sums(
    behaviour: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Each row's KL penalty for the reward: the sum over its completion tokens of the KL
    estimate between the behaviour policy (the rollout engine's log-probs) and the reference,
    [B] (verl's use_kl_in_reward with GRPO sums token-level KL rewards the same way)."""
    return (kl_estimate(behaviour, reference, estimator) * mask).sum(-1)


def gather_rows(
    mine: torch.Tensor, offset: int, total: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Every rank's per-row values in the order of all rows: each rank writes its own share at
    its offset into zeros, and the sum over ranks fills them all."""
    every = torch.zeros(total, dtype=torch.float64)
    every[offset : offset + mine.numel()] = mine.to(torch.float64)
    return all_reduce(every)


def local_units(masks: Sequence[torch.Tensor], rewards: Sequence[torch.Tensor], loss_type: str):
    """[completion tokens, loss units (tokens or non-empty completions, by loss_type), tokens of
    completions with a reward > 0] of a rank's micro-batches, to be summed over ranks."""
    tokens = sum(float(m.sum()) for m in masks)
    units = sum(loss_units(m, loss_type) for m in masks)
    positive = sum(float(m[r > 0].sum()) for m, r in zip(masks, rewards, strict=True))
    return torch.tensor([tokens, units, positive], dtype=torch.float64)
