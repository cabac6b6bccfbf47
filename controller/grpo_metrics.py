"""What a GRPO step reports about its rollouts, computed by the controller from the groups of
the batch, and the sample completions it logs.

The rollout replicas measure what only they can (generation and scoring seconds, their idle
time, the decoded text, each reward function's value) and carry it in the `RolloutGroup`s;
everything else is computed here from the groups themselves. Every key is defined in
gantry.comm.metrics (name, unit, how) and listed in docs/metrics.md. Pure Python: the
controller imports no torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from gantry.comm.protocol import RolloutGroup
from gantry.comm.transport import Delivery, Latencies, percentile

# Groups whose completions (all n of each) a logging step writes to the "samples" journal list.
SAMPLES_PER_LOG = 4
# policy.grpo.group_advantages' eps: the logged advantages are the ones the policy trains with.
ADVANTAGE_EPS = 1e-4


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _std(values: Sequence[float], unbiased: bool) -> float:
    """Standard deviation; plain floats (statistics.stdev's exact arithmetic is ~10x slower)."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - unbiased))


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / (std + eps) of one group, std the unbiased (n - 1) one, as the policy
    computes them (policy.grpo.group_advantages; GRPO has n >= 2, a lone sample gets 0)."""
    if len(rewards) < 2:
        return [0.0] * len(rewards)
    mean, std = _mean(rewards), _std(rewards, unbiased=True)
    return [(r - mean) / (std + ADVANTAGE_EPS) for r in rewards]


def staleness_histogram(staleness: Sequence[int], max_staleness: int) -> list[int]:
    """Groups per staleness value: element i counts the groups i versions behind (0 up to
    max_staleness, or further if a group is: the list's length is the same every step)."""
    counts = [0] * (max(max_staleness, *staleness, 0) + 1)
    for value in staleness:
        counts[value] += 1
    return counts


def rollout_metrics(
    groups: Sequence[RolloutGroup], staleness: Sequence[int], max_staleness: int
) -> dict[str, float | list[int]]:
    """The step's rollout-side metrics (gantry.comm.metrics.CONTROLLER) from its groups and
    each group's staleness (policy version at sending - the version that generated it)."""
    grouped = [[s.reward for s in g.samples] for g in groups]
    rewards = [r for group in grouped for r in group]
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    truncated = sum(s.finish_reason == "length" for g in groups for s in g.samples)
    metrics: dict[str, float | list[int]] = {
        "reward_mean": _mean(rewards),
        "reward_std": _std(rewards, unbiased=False),
        "reward_min": min(rewards),
        "reward_max": max(rewards),
        "reward_group_std_mean": _mean([_std(group, unbiased=True) for group in grouped]),
        "groups_all_equal_fraction": _mean([len(set(group)) == 1 for group in grouped]),
        "completion_len_mean": _mean(lengths),
        "completion_len_max": max(lengths),
        "truncated_fraction": truncated / len(lengths),
        "staleness_mean": _mean(staleness),
        "staleness_max": max(staleness),
        "staleness_hist": staleness_histogram(staleness, max_staleness),
        "generation_seconds": math.fsum(g.generation_seconds for g in groups),
        "scoring_seconds": math.fsum(g.scoring_seconds for g in groups),
    }
    metrics.update(reward_function_means(groups))
    metrics.update(shaping_metrics(groups))
    return metrics


def dynamic_sampling_metrics(kept: int, dropped: Sequence[str]) -> dict[str, float | list]:
    """DAPO: the groups drawn for the step (its batch's and those dropped since the previous
    batch for equal rewards), the dropped ones and their prompt ids (the audit trail)."""
    return {
        "dapo_groups_drawn": kept + len(dropped),
        "dapo_groups_dropped": len(dropped),
        "dropped_prompt_ids": list(dropped),
    }


def shaping_metrics(groups: Sequence[RolloutGroup]) -> dict[str, float]:
    """`overlong_penalised_fraction` (when the 'overlong' reward part is there) and
    `reward_info/<key>`: the mean of each numeric info value the reward functions returned."""
    metrics: dict[str, float] = {}
    penalties = [
        s.reward_parts[g.reward_names.index("overlong")]
        for g in groups
        if "overlong" in g.reward_names
        for s in g.samples
    ]
    if penalties:
        metrics["overlong_penalised_fraction"] = _mean([p < 0 for p in penalties])
    values: dict[str, list[float]] = {}
    for group in groups:
        for sample in group.samples:
            for key, value in sample.reward_info.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values.setdefault(f"reward_info/{key}", []).append(value)
    metrics.update({key: _mean(v) for key, v in values.items()})
    return metrics


def reward_function_means(groups: Sequence[RolloutGroup]) -> dict[str, float]:
    """`reward/<name>`: each reward function's mean over the completions that report it."""
    values: dict[str, list[float]] = {}
    for group in groups:
        # One column per function: transposed once per group, not looked up per value.
        columns = zip(*(s.reward_parts for s in group.samples), strict=True)
        for name, column in zip(group.reward_names, columns, strict=False):
            values.setdefault(f"reward/{name}", []).extend(column)
    return {name: _mean(v) for name, v in values.items()}


def sample_rows(groups: Sequence[RolloutGroup]) -> list[dict]:
    """One flat row per completion of `groups`: prompt, completion, its rewards (total and per
    function), its advantage, the weights that generated it and why it ended."""
    rows = []
    for group in groups:
        advantages = group_advantages([s.reward for s in group.samples])
        for sample, advantage in zip(group.samples, advantages, strict=True):
            parts = zip(group.reward_names, sample.reward_parts, strict=False)
            rows.append(
                {
                    "prompt_id": group.prompt_id,
                    "prompt": group.prompt_text,
                    "completion": sample.text,
                    "reward": sample.reward,
                    **{f"reward/{name}": value for name, value in parts},
                    "advantage": advantage,
                    "policy_version": group.policy_version,
                    "finish_reason": sample.finish_reason,
                    # Flat scalar columns: the trackers' tables take no nested values.
                    **{f"reward_info/{k}": v for k, v in sample.reward_info.items()},
                }
            )
    return rows


class StepClock:
    """The controller's own time between two steps, and the rollout replicas' idle fraction
    over the results received in that time."""

    def __init__(self) -> None:
        self._cpu = time.thread_time()
        self._idle = self._busy = 0.0
        self._idle_fraction = 0.0

    def received(self, group: RolloutGroup) -> None:
        self._idle += group.idle_seconds
        self._busy += group.busy_seconds

    def lap(self) -> dict[str, float]:
        """`controller_seconds` and `rollout_idle_fraction` since the previous lap.

        The controller's seconds are the CPU time of its loop's thread (the caller's): work,
        not the time it blocks reading its streams. With no rollout result since the last lap,
        the idle fraction is the last one (a replica reports its idle time with its results)."""
        cpu = time.thread_time()
        seconds, self._cpu = cpu - self._cpu, cpu
        if self._idle + self._busy > 0:
            self._idle_fraction = self._idle / (self._idle + self._busy)
        self._idle = self._busy = 0.0
        return {"controller_seconds": seconds, "rollout_idle_fraction": self._idle_fraction}


class ControlCost:
    """The control plane's own cost over a step: each message's latency from its send to its
    handling (the controller's results and events, the policy's commands), the rollout
    replicas' time from a sync order to taking it, and the controller process's CPU time."""

    def __init__(self) -> None:
        self.latencies = Latencies()
        self.sync_orders: list[float] = []
        self._cpu = time.process_time()

    def handled(self, delivery: Delivery) -> None:
        self.latencies.handled(delivery.entry_id)

    def lap(self, policy_latencies_ms: Sequence[float]) -> dict[str, float]:
        """The step's control_latency_p50_ms / _p99_ms, sync_order_latency_ms (0 with no sync
        taken since the previous step) and controller_cpu_s."""
        values = self.latencies.take() + list(policy_latencies_ms)
        cpu = time.process_time()
        seconds, self._cpu = cpu - self._cpu, cpu
        orders, self.sync_orders = self.sync_orders, []
        return {
            "control_latency_p50_ms": percentile(values, 50),
            "control_latency_p99_ms": percentile(values, 99),
            "sync_order_latency_ms": max(orders, default=0.0),
            "controller_cpu_s": seconds,
        }
