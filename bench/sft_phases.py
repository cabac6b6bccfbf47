"""Where an SFT step's time goes, for bench/sft_throughput.py: timers wrapped around the
functions that both sides' steps call (Gantry's `SFTTrainer` and the benchmark's plain loop),
split into encoding, collating / padding, forward, backward, clipping and the optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict


@contextlib.contextmanager
def breakdown(trainer, plain, totals: dict):
    """Time the phases of both sides' steps (wrapping the functions they call) into `totals`
    (side -> phase -> seconds); undone on exit."""
    import torch

    current = {"side": None}

    def timed(phase, fn):
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[current["side"]][phase] += time.perf_counter() - started

        return wrapper

    patches = [
        (trainer.steps, "take", "encode"),  # encoding inline, or the wait for the workers
        (trainer, "_on_device", "collate"),
        (plain, "pad", "collate"),
        (trainer, "_loss_sum", "forward"),
        (plain, "_loss_sum", "forward"),
        (torch.Tensor, "backward", "backward"),
        (torch.nn.utils, "clip_grad_norm_", "clip"),
        (trainer.optimizer, "step", "optimizer"),
        (plain.optimizer, "step", "optimizer"),
    ]
    saved = []
    for owner, attr, phase in patches:
        had = attr in vars(owner)
        saved.append((owner, attr, had, vars(owner).get(attr)))
        setattr(owner, attr, timed(phase, getattr(owner, attr)))

    def step_of(name, side):
        def step(indices, next_indices):
            current["side"] = name
            started = time.perf_counter()
            try:
                return side.step(indices, next_indices)
            finally:
                totals[name]["step"] += time.perf_counter() - started

        return step

    try:
        yield step_of
    finally:
        for owner, attr, had, value in reversed(saved):
            if had:
                setattr(owner, attr, value)
            else:
                delattr(owner, attr)


def measure_breakdown(args, trainer, plain, batches: list[list[int]]) -> dict:
    totals: dict = {"baseline": defaultdict(float), "gantry": defaultdict(float)}
    chunk = [batches[i % len(batches)] for i in range(args.steps + 1)]
    with breakdown(trainer, plain, totals) as step_of:
        for name, side in (("baseline", plain), ("gantry", trainer)):
            step = step_of(name, side)
            for indices, following in zip(chunk, chunk[1:] + [[]], strict=True):
                step(indices, following)
    return {name: {k: v / len(chunk) for k, v in phases.items()} for name, phases in totals.items()}
