"""The controller's bookkeeping, free of I/O: prompt order, in-flight window, staleness, batches.

`PromptQueue` yields every dataset index once per epoch in a seeded order (or in file order) and takes back
prompts to retry. `RolloutBuffer` accepts each prompt's result once, drops results older than
the staleness bound (they go back to the queue), and hands out batches of whole groups. With
DAPO's dynamic sampling (`drop_equal`) it drops a group whose completions all got the same
reward (no advantage, no gradient): the prompt counts as visited, not trained, and is not
retried; the plan draws more prompts to fill the batch.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gantry.comm.protocol import PromptTask, RolloutGroup, prompt_id_parts
from gantry.config import ConfigError


def task_of(prompt_id: str) -> PromptTask:
    """The PromptTask a prompt id ("<epoch>:<index>") was made from, to dispatch it again."""
    epoch, index = prompt_id_parts(prompt_id)
    return PromptTask(prompt_id=prompt_id, epoch=epoch, index=index)


class PromptQueue:
    def __init__(self, dataset_size: int, epochs: int, seed: int, shuffle: bool = True) -> None:
        self.dataset_size, self.epochs, self.seed = dataset_size, epochs, seed
        self.shuffle = shuffle
        self._epoch = 0
        self._order: deque[int] = deque()
        self._retry: deque[PromptTask] = deque()

    def next(self) -> PromptTask | None:
        """The next prompt to dispatch, retries first; None when every epoch is handed out."""
        if self._retry:
            return self._retry.popleft()
        if not self._order:
            if self._epoch >= self.epochs:
                return None
            self._order.extend(self._epoch_order(self._epoch))
            self._epoch += 1
        index = self._order.popleft()
        epoch = self._epoch - 1
        return PromptTask(prompt_id=f"{epoch}:{index}", epoch=epoch, index=index)

    def peek(self, n: int) -> list[int]:
        """The dataset indices of the next `n` tasks (fewer at the end), without taking them."""
        ahead = [task.index for task in itertools.islice(self._retry, n)]
        ahead += itertools.islice(self._order, n - len(ahead))
        epoch = self._epoch
        while len(ahead) < n and epoch < self.epochs:
            ahead += self._epoch_order(epoch)[: n - len(ahead)]
            epoch += 1
        return ahead

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.dataset_size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def retry(self, task: PromptTask) -> None:
        self._retry.append(task)

    def state(self, pending: list[str] = ()) -> dict:
        """The queue as JSON, with `pending` (prompt ids handed out but not trained) put back
        in front, so a run resumed from this state trains every prompt exactly once. The
        epoch's order is not stored, only how far into it the queue is: the order is the
        seed's, so the state stays small however large the dataset."""
        retry = sorted(pending, key=prompt_id_parts) + [t.prompt_id for t in self._retry]
        position = self.dataset_size - len(self._order) if self._epoch else 0
        return {"epoch": self._epoch, "position": position, "retry": retry}

    def restore(self, state: dict) -> None:
        self._epoch = state["epoch"]
        order = self._epoch_order(self._epoch - 1) if self._epoch else []
        self._order = deque(order[state["position"] :])
        self._retry = deque(task_of(prompt_id) for prompt_id in state["retry"])


@dataclass
class BufferStats:
    accepted: int = 0
    dropped_stale: int = 0
    duplicates: int = 0
    dropped_equal: int = 0  # DAPO: groups dropped so far for equal rewards
    # DAPO: the prompts dropped since the last batch was taken (the next step's audit trail).
    dropped_since_batch: list[str] = field(default_factory=list)


class RolloutBuffer:
    """Results waiting for a policy step; each prompt is trained at most once."""

    def __init__(
        self,
        groups_per_step: int,
        max_staleness: int,
        drop_equal: bool = False,
        filter_names: Sequence[str] = (),
    ) -> None:
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.drop_equal = drop_equal
        # DAPO's filter_reward_metric: the reward functions whose values decide (all: the reward).
        self.filter_names = tuple(filter_names)
        self._groups: deque[tuple[RolloutGroup, str]] = deque()
        self._seen: set[str] = set()
        self.stats = BufferStats()

    def __len__(self) -> int:
        return len(self._groups)

    def prompt_ids(self) -> list[str]:
        """The prompts whose results wait here for a batch."""
        return [group.prompt_id for group, _ in self._groups]

    def entry_ids(self) -> list[str]:
        """The stream entries of the buffered results, in order (a controller's snapshot)."""
        return [entry_id for _, entry_id in self._groups]

    def restore(
        self, groups: list[tuple[RolloutGroup, str]], seen: set[str], stats: BufferStats
    ) -> None:
        """The buffer of a snapshot: its results (read back from the stream), the prompts it
        accepted so far, and its counters."""
        self._groups = deque(groups)
        self._seen = set(seen)
        self.stats = replace(stats, dropped_since_batch=list(stats.dropped_since_batch))

    def add(self, group: RolloutGroup, entry_id: str, version: int) -> str:
        """'accepted', 'stale' (too old: retry the prompt), 'duplicate' (already have it) or,
        with drop_equal, 'dropped' (every completion got the same reward: visited, not kept)."""
        if group.prompt_id in self._seen:
            self.stats.duplicates += 1
            return "duplicate"
        if version - group.policy_version > self.max_staleness:
            self.stats.dropped_stale += 1
            return "stale"
        self._seen.add(group.prompt_id)
        if self.drop_equal and len(set(self._filter_values(group))) == 1:
            self.stats.dropped_equal += 1
            self.stats.dropped_since_batch.append(group.prompt_id)
            return "dropped"
        self._groups.append((group, entry_id))
        self.stats.accepted += 1
        return "accepted"

    def _filter_values(self, group: RolloutGroup) -> list[float]:
        if not self.filter_names:
            return [s.reward for s in group.samples]
        missing = [n for n in self.filter_names if n not in group.reward_names]
        if missing:
            raise ConfigError([
                f"train.train_policy.filter_reward_metric names {missing}, not reward functions "
                f"of the dataset script (its reward_fns: {group.reward_names})"
            ])  # fmt: skip
        at = [group.reward_names.index(name) for name in self.filter_names]
        return [sum(s.reward_parts[i] for i in at) for s in group.samples]

    def take_batch(
        self, version: int
    ) -> tuple[list[tuple[RolloutGroup, str]], list[tuple[RolloutGroup, str]]]:
        """(batch, expired): a full batch when one is ready (else empty), and the groups that
        went past the staleness bound while waiting, which the caller re-queues."""
        expired = []
        kept: deque[tuple[RolloutGroup, str]] = deque()
        for group, entry_id in self._groups:
            if version - group.policy_version > self.max_staleness:
                self._seen.discard(group.prompt_id)
                self.stats.dropped_stale += 1
                expired.append((group, entry_id))
            else:
                kept.append((group, entry_id))
        self._groups = kept
        if len(self._groups) < self.groups_per_step:
            return [], expired
        batch = [self._groups.popleft() for _ in range(self.groups_per_step)]
        return batch, expired
