"""How a group's completions are scored: the script's reward functions (plain, batched, async),
the remote reward server, DAPO's overlong penalty, each with its weight.

    rewards = RewardSet(script, config.train.train_policy, max_response_length)
    scored = rewards.score_group(texts, lengths, sample, index, prompt_id, guard)
    # -> per completion: (weighted total, raw parts in `rewards.names` order, info dict)

A reward function is one of
- plain: `fn(completion, sample) -> float` (or `(float, info_dict)`), called per completion;
- batched (`fn.batched = True`, or `@gantry.data.rewards.batched`): `fn(completions, sample)
  -> list[float]` (or `(list[float], list[info_dict])`), called once per group, for rewards
  that compare completions or call a model once;
- async (`async def`): awaited; the group's n calls run concurrently (a batched one: one call).
Each call (a batched or async one: the group's) runs inside `guard(name)`, the reward deadline
(rollout.reward_timeout). The total is sum(weight_i * part_i); `parts` are the functions' own
values (metrics reward/<name>); `info` dicts of one completion are merged (logged in
samples.jsonl). A non-finite value or a wrong type stops the run naming the function.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from gantry.config.rewards import overlong_penalty, reward_weights
from gantry.data.plugin import DatasetScript, DatasetScriptError, call_user_code, checked_reward
from gantry.data.remote_reward import RemoteReward

OVERLONG = "overlong"
# cosmos-rl's built-in reward names: a cosmos-rl script that passes its own reward_fns makes
# cosmos-rl ignore reward_function, and Gantry does the same with these names.
COSMOS_BUILTINS = frozenset({"direct_math", "boxed_math", "single_choice", "gsm8k", "format"})

Guard = Callable[[str], AbstractContextManager]


def batched(fn: Callable) -> Callable:
    """Mark `fn` as batched: called once with all completions of a group (a list of str)."""
    fn.batched = True
    return fn


@dataclass
class RewardFn:
    name: str
    fn: Callable[..., Any] | None  # None: the overlong penalty (computed here)
    weight: float = 1.0

    @property
    def is_batched(self) -> bool:
        return bool(getattr(self.fn, "batched", False))

    @property
    def is_async(self) -> bool:
        fn = self.fn
        return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
        )


class RewardSet:
    """The reward functions of a run with their weights (train.train_policy)."""

    def __init__(self, script: DatasetScript, policy: Any, max_response_length: int) -> None:
        self.path = script.path
        self.max_response_length = max_response_length
        self.overlong = policy.overlong_reward
        fns = [RewardFn(n, f) for n, f in zip(script.reward_names, script.reward_fns, strict=True)]
        server = policy.reward_server
        if server.url:
            fns.append(
                RewardFn(server.name, RemoteReward(server.url, server.timeout, server.retries))
            )
        weights = reward_weights(policy.reward_function)
        if script_is_cosmos(script) and not set(weights) <= {f.name for f in fns} | {OVERLONG}:
            weights = {}  # cosmos-rl ignores reward_function when launch_worker has reward_fns
        if self.overlong.enable_overlong_penalty or OVERLONG in weights:
            fns.append(RewardFn(OVERLONG, None))
            if self.overlong.buffer_length > max_response_length:
                raise DatasetScriptError(
                    f"train.train_policy.overlong_reward.buffer_length = "
                    f"{self.overlong.buffer_length} is longer than rollout.max_response_length = "
                    f"{max_response_length}: every completion would be penalised; lower it"
                )
        if weights and self.overlong.enable_overlong_penalty:
            weights.setdefault(OVERLONG, 1.0)
        self.fns = _weighted(fns, weights, self.path)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fns]

    @property
    def weights(self) -> list[float]:
        return [f.weight for f in self.fns]

    def score_group(
        self,
        completions: Sequence[str],
        lengths: Sequence[int],
        sample: Any,
        index: int,
        prompt_id: str = "",
        guard: Guard | None = None,
    ) -> list[tuple[float, list[float], dict]]:
        """Per completion: (weighted total, each function's value, merged info)."""
        columns, infos = [], [{} for _ in completions]
        for reward in self.fns:
            with guard(reward.name) if guard is not None else nullcontext():
                values = self._call(reward, completions, lengths, sample, index, prompt_id)
            column = []
            for i, (value, info) in enumerate(values):
                column.append(
                    checked_reward(
                        f"{self.path}: reward function {reward.name}", value, index, completions[i]
                    )
                )
                if info:
                    infos[i].update(self._checked_info(reward.name, info, index))
            columns.append(column)
        rows = list(zip(*columns, strict=True)) if columns else [() for _ in completions]
        return [
            (math.fsum(w * p for w, p in zip(self.weights, parts, strict=True)), list(parts), info)
            for parts, info in zip(rows, infos, strict=True)
        ]

    def _call(self, reward, completions, lengths, sample, index, prompt_id) -> list[tuple]:
        if reward.fn is None:
            o = self.overlong
            return [
                (
                    overlong_penalty(
                        n, self.max_response_length, o.buffer_length, o.penalty_factor
                    ),
                    None,
                )
                for n in lengths
            ]
        what = f"{self.path}: reward function {reward.name}"
        detail = lambda: f"  on sample {index}: {repr(sample)[:300]}\n"  # noqa: E731
        if isinstance(reward.fn, RemoteReward):  # its errors are one line naming the URL
            result = reward.fn(list(completions), sample, prompt_id)
            return self._unbatched(reward.name, result, len(completions), index)
        if reward.is_batched:
            args = (list(completions), sample)
            if reward.is_async:
                result = call_user_code(what, lambda: asyncio.run(reward.fn(*args)), detail=detail)
            else:
                result = call_user_code(what, reward.fn, *args, detail=detail)
            return self._unbatched(reward.name, result, len(completions), index)
        if reward.is_async:

            async def gather():
                return await asyncio.gather(*(reward.fn(c, sample) for c in completions))

            results = call_user_code(what, lambda: asyncio.run(gather()), detail=detail)
        else:
            results = [
                call_user_code(what, reward.fn, c, sample, detail=detail) for c in completions
            ]
        return [_split(r) for r in results]

    def _unbatched(self, name: str, result: Any, n: int, index: int) -> list[tuple]:
        values, infos = result, None
        if isinstance(result, tuple) and len(result) == 2:
            values, infos = result
        if not isinstance(values, list | tuple) or len(values) != n:
            raise DatasetScriptError(
                f"{self.path}: batched reward function {name} returned {_short(values)} on "
                f"sample {index}; it must return a list of {n} floats (one per completion)"
            )
        if infos is None:
            infos = [None] * n
        if not isinstance(infos, list | tuple) or len(infos) != n:
            raise DatasetScriptError(
                f"{self.path}: batched reward function {name} returned infos {_short(infos)} on "
                f"sample {index}; give a list of {n} dicts (one per completion)"
            )
        return list(zip(values, infos, strict=True))

    def _checked_info(self, name: str, info: Any, index: int) -> dict:
        if not isinstance(info, dict):
            raise DatasetScriptError(
                f"{self.path}: reward function {name} returned info {_short(info)} on sample "
                f"{index}; the second value of (reward, info) must be a dict"
            )
        return {str(k): _jsonable(v) for k, v in info.items()}


def script_is_cosmos(script: DatasetScript) -> bool:
    from gantry.cosmos import is_cosmos_script

    return is_cosmos_script(script.path)


def _weighted(fns: list[RewardFn], weights: dict[str, float], path: Any) -> list[RewardFn]:
    """Apply reward_function's weights; with it set, every function must be named (weight 0
    turns one off while it is still logged) and every name must be a function."""
    if not weights:
        return fns
    names = [f.name for f in fns]
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise DatasetScriptError(
            f"train.train_policy.reward_function names {unknown[0]!r}, which is no reward "
            f"function of {path} (it has: {', '.join(names)})"
        )
    unnamed = [n for n in names if n not in weights]
    if unnamed:
        raise DatasetScriptError(
            f"train.train_policy.reward_function gives no weight to {unnamed[0]!r} "
            f"({path}): name every reward function (weight 0 turns one off)"
        )
    for f in fns:
        f.weight = float(weights[f.name])
    return fns


def _split(result: Any) -> tuple[Any, Any]:
    if isinstance(result, tuple) and len(result) == 2:
        return result
    return result, None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)[:200]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."
