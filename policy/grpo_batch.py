"""A GRPO step's batch-wide quantities, the same on every policy rank: advantages from the
rewards of all groups (normalised per group, by the batch's std, or not at all), the KL
penalty moved into the rewards (use_kl_in_reward), the loss's global denominators, and the
shared prefixes left out of the loss (min_filter_prefix_tokens).

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


def shared_prefix_ignores(
    completions: Sequence[Sequence[int]],
    rewards: Sequence[float],
    min_tokens: int | None,
    end_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """cosmos-rl's `min_filter_prefix_tokens`: how many leading tokens of each completion of
    one group the loss leaves out. Completions that share a prefix of at least `min_tokens`
    tokens (a maximal one: no longer prefix is shared by two of them) but got different rewards
    would push that prefix both ways: its tokens are left out for each of them, unless the
    prefix is the whole completion (nothing after it but an end token, `end_ids`), as in
    cosmos-rl's reward calculator. A group whose rewards are all equal is left as it is."""
    ignores = [0] * len(completions)
    if not min_tokens or len(set(rewards)) < 2:
        return ignores
    for length, members in _maximal_prefix_groups(completions, min_tokens):
        if len({rewards[i] for i in members}) < 2:
            continue
        for i in members:
            if any(token not in end_ids for token in completions[i][length:]):
                ignores[i] = length
    return ignores


def _maximal_prefix_groups(
    sequences: Sequence[Sequence[int]], min_tokens: int
) -> list[tuple[int, list[int]]]:
    """(prefix length, members) of each prefix of >= min_tokens tokens shared by two or more
    sequences and not extended by two of them (a trie's deepest shared nodes)."""
    root: dict = {"members": [], "children": {}}
    for index, sequence in enumerate(sequences):
        node = root
        for token in sequence:
            node = node["children"].setdefault(token, {"members": [], "children": {}})
            node["members"].append(index)
    groups, stack = [], [(root, 0)]
    while stack:
        node, depth = stack.pop()
        shared = [child for child in node["children"].values() if len(child["members"]) > 1]
        if depth >= min_tokens and len(node["members"]) > 1 and not shared:
            groups.append((depth, node["members"]))
        stack.extend((child, depth + 1) for child in shared)
    return groups
