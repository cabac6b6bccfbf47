"""The policy's step metrics beyond the loss statistics of `policy.grpo`: small pure functions
the trainers and the worker call, each checked against hand-computed values in
tests/test_policy_metrics.py. Names, units and definitions: `gantry.comm.metrics.POLICY`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from gantry.comm.weights import SendStats

# Log-probs turned into entropies at a time: p * log p is a second tensor of the chunk's size.
# On CPU a chunk that stays in cache is fastest (measured: 256 KB ~4x faster than 16 MB); on a
# GPU a large one saves kernel launches while bounding the extra memory (64 MB in float32).
ENTROPY_CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}


def token_entropy(logprobs: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """-sum_v p log p of each position's distribution, from its log-probs [..., V] -> [...],
    without gradient. Tokens at -inf (masked out of sampling) have p = 0 and add nothing."""
    if chunk_elements is None:
        chunk_elements = ENTROPY_CHUNK_ELEMENTS.get(logprobs.device.type, 1 << 20)
    with torch.no_grad():
        flat = logprobs.detach().reshape(-1, logprobs.shape[-1])
        out = flat.new_empty(flat.shape[0])
        step = max(1, chunk_elements // max(flat.shape[1], 1))
        smallest = torch.finfo(flat.dtype).min
        for start in range(0, flat.shape[0], step):
            part = flat[start : start + step]
            # clamp: 0 * -inf would be nan; exp(finfo.min) is 0 all the same.
            out[start : start + step] = -(part.exp() * part.clamp(min=smallest)).sum(-1)
        return out.view(logprobs.shape[:-1])


def padding_counts(attention_masks: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(pad positions, all positions) of right-padded batches: the sums to reduce over ranks
    before dividing (padding_fraction = pad / all)."""
    total = sum(float(m.numel()) for m in attention_masks)
    real = sum(float(m.sum()) for m in attention_masks)
    return total - real, total


def idle_fraction(totals: dict[str, float]) -> float:
    """The share of `Activity.take_totals()`'s seconds spent in the "idle" state (0 when no
    time passed)."""
    wall = sum(totals.values())
    return totals.get("idle", 0.0) / wall if wall > 0 else 0.0


def sync_metrics(stats: SendStats | None) -> dict[str, float]:
    """The step metrics of the latest weight sync this rank sent (zeros before the first)."""
    if stats is None:
        return dict.fromkeys(
            ("weight_sync_s", "weight_sync_wait_s", "weight_sync_gbps", "weight_sync_efficiency"),
            0.0,
        )
    gbps = stats.bytes / 1e9 / stats.send_s if stats.send_s > 0 else 0.0
    return {
        "weight_sync_s": stats.send_s,
        "weight_sync_wait_s": stats.wait_s,
        "weight_sync_gbps": gbps,
        "weight_sync_efficiency": gbps / stats.raw_gbps if stats.raw_gbps > 0 else 0.0,
    }


class PhaseClock:
    """Seconds spent in each phase of a step (forward, backward, optimizer), summed over the
    phase's turns. On CUDA the device is synchronised when a phase starts and ends, so its
    kernels are counted to it rather than to the phase that next waits for them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[name] += time.perf_counter() - started

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class _Entropy(torch.autograd.Function):
    """H = -sum_v p log p from log-probs [N, V] -> [N], with gradient dH/dlogp_v =
    -p_v (1 + log p_v) (through log_softmax this is dH/dz_v = -p_v (log p_v + H)). Computed in
    chunks in both directions: autograd would keep p and p log p, two more [N, V] copies."""

    @staticmethod
    def forward(ctx, logprobs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logprobs)
        return token_entropy(logprobs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (logprobs,) = ctx.saved_tensors
        out = torch.empty_like(logprobs)
        chunk = ENTROPY_CHUNK_ELEMENTS.get(logprobs.device.type, 1 << 20)
        step = max(1, chunk // max(logprobs.shape[1], 1))
        smallest = torch.finfo(logprobs.dtype).min
        for start in range(0, logprobs.shape[0], step):
            part = logprobs[start : start + step]
            # A banned token (-inf) has p = 0: clamp keeps 0 * -inf from becoming nan.
            term = part.exp() * (1.0 + part.clamp(min=smallest))
            out[start : start + step] = -term * grad[start : start + step].unsqueeze(1)
        return out


def differentiable_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """`token_entropy` of log-probs [..., V] -> [...] with a gradient (the entropy bonus),
    holding no [..., V] tensor beyond its input and, in the backward, the input's gradient."""
    flat = logprobs.reshape(-1, logprobs.shape[-1])
    return _Entropy.apply(flat).view(logprobs.shape[:-1])
