"""Dataset scripts: the plugin API through which users bring their data and reward functions.

A script is a plain Python file, imported by path in every process that needs it. It exposes
    get_dataset(config) -> a sequence of samples (dicts)   # config: the [custom] section
    get_val_dataset(config) -> samples                     # optional: validation, evaluation
    reward_fns = [fn, ...]   # GRPO; fn(completion: str, sample: dict, **kw) -> float, summed
                             # (weights, batched, async, (value, info): gantry.data.rewards)
A sample has "messages" (chat messages) or "prompt" (a string, sent as one user message), plus
any fields the reward functions read. GRPO and evaluation prompt the model with the messages
before the last assistant turn (all of them when there is none); SFT trains on the assistant
turns. Message contents are strings, or lists of parts for images and videos:
{"type": "text", "text": ...}, {"type": "image", "image": path}, {"type": "video", "video": path}
(see gantry/data/media.py). A script written for cosmos-rl (it imports `cosmos_rl`) is run by
gantry.cosmos and mapped onto the same API (docs/cosmos-rl.md). Every failure names the script's path,
the function and, for rewards, the sample it failed on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gantry.run.errors import RecursOnRetry

_MODULE_NAME = "gantry_dataset_script"


class DatasetScriptError(RecursOnRetry, ValueError):
    """The dataset script cannot be used, or its code raised, or it returned what a run cannot
    take: the same script on the same data fails again, so a run does not restart on it."""


def checked_reward(what: str, value: Any, index: int, completion: str) -> float:
    """A reward function's value as a float, or DatasetScriptError naming `what` returned it
    (its script and function), the sample and the completion."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DatasetScriptError(
            f"{what} returned {value!r} on sample {index}; it must return a float (or a "
            "(float, dict) pair)"
        )
    if not math.isfinite(value):  # one inf or NaN reward makes every weight NaN
        raise DatasetScriptError(
            f"{what} returned {value!r} on sample {index} (completion {completion!r:.80}); a "
            "reward must be a finite float"
        )
    return float(value)


@dataclass
class DatasetScript:
    path: Path
    get_dataset: Callable[[dict], Sequence[Any]]
    reward_fns: list[Callable[..., float]]
    get_val_dataset: Callable[[dict], Sequence[Any]] | None = None

    def load_samples(self, custom: dict) -> Sequence[Any]:
        """Call the script's get_dataset and check what it returns."""
        return self._call("get_dataset", self.get_dataset, custom)

    def load_val_samples(self, custom: dict) -> Sequence[Any]:
        """Call the script's get_val_dataset (an error if it has none)."""
        if self.get_val_dataset is None:
            raise DatasetScriptError(
                f"{self.path}: defines no get_val_dataset(config); validation and evaluation "
                "need one that returns the validation samples"
            )
        return self._call("get_val_dataset", self.get_val_dataset, custom)

    def _call(self, name: str, fn: Callable, custom: dict) -> Sequence[Any]:
        samples = call_user_code(f"{self.path}: {name}", fn, custom)
        if isinstance(samples, Mapping | str | bytes):  # has len(), but [0] is no sample
            raise DatasetScriptError(
                f"{self.path}: {name} returned a {type(samples).__name__}; return a list of "
                "samples (dicts with 'messages' or 'prompt') or a torch Dataset"
                + (" (the dict's values, list(d.values()), may be what you meant)"
                   if isinstance(samples, Mapping) else "")
            )  # fmt: skip
        try:
            size = len(samples)
        except TypeError as exc:
            raise DatasetScriptError(
                f"{self.path}: {name} returned {type(samples).__name__}, which has no "
                "len(); return a list of samples or a torch Dataset"
            ) from exc
        if size == 0:
            raise DatasetScriptError(f"{self.path}: {name} returned no samples")
        prompt_messages(samples[0], self.path, 0)
        return samples

    def score(self, completion: str, sample: Any, index: int) -> float:
        """Sum of the reward functions for one completion of `sample` (dataset index `index`),
        unweighted (a run's rewards, weighted and batched: gantry.data.rewards.RewardSet)."""
        return sum(self.score_parts(completion, sample, index), 0.0)

    @property
    def reward_names(self) -> list[str]:
        """The reward functions' names (metrics `reward/<name>`), a repeated one numbered."""
        names: list[str] = []
        for fn in self.reward_fns:
            name = getattr(fn, "__name__", type(fn).__name__)
            names.append(name if name not in names else f"{name}_{len(names) + 1}")
        return names

    def score_parts(
        self,
        completion: str,
        sample: Any,
        index: int,
        guard: Callable[[str], AbstractContextManager] | None = None,
    ) -> list[float]:
        """Each reward function's value for one completion, in `reward_fns` order; each call
        runs inside `guard(function name)` when given (a deadline)."""
        parts = []
        for fn in self.reward_fns:
            name = getattr(fn, "__name__", repr(fn))
            with guard(name) if guard is not None else nullcontext():
                value = call_user_code(
                    f"{self.path}: reward function {name}",
                    fn,
                    completion,
                    sample,
                    detail=lambda: (
                        f"  on sample {index}: {_short(sample)}\n"
                        f"  completion: {completion!r:.200}\n"
                    ),
                )
            if inspect.isawaitable(value):  # an async reward function
                value = call_user_code(f"{self.path}: reward function {name}", asyncio.run, value)
            if isinstance(value, tuple) and len(value) == 2:  # (value, info): info logged
                value = value[0]
            parts.append(
                checked_reward(f"{self.path}: reward function {name}", value, index, completion)
            )
        return parts


def call_user_code(
    what: str, fn: Callable[..., Any], *args: Any, detail: Callable[[], str] | None = None
) -> Any:
    """`fn(*args)`, where `fn` is the script's code (`what` names it, with the script's path).
    Whatever it raises becomes a DatasetScriptError that says what failed, `detail()` (the
    sample, for a reward) and the script's own traceback frames."""
    try:
        return fn(*args)
    except Exception as exc:  # the user's code may raise anything: report where, then stop
        raise DatasetScriptError(
            f"{what} raised {type(exc).__name__}: {exc}\n"
            + (detail() if detail is not None else "")
            + _user_traceback(exc)
        ) from exc


def load_dataset_script(
    path: str | Path,
    *,
    need_rewards: bool = True,
    config: Any = None,
    model_path: str | None = None,
    config_source: str | Path | None = None,
) -> DatasetScript:
    """Import the script at `path` and check it has what a run needs.

    A script written for cosmos-rl (it imports `cosmos_rl`) goes through gantry.cosmos, which
    needs the run's resolved `config` (GantryConfig), the resolved `model_path` (its tokenizer)
    and, to keep keys Gantry does not use, the user's TOML (`config_source`)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DatasetScriptError(f"dataset script {path} does not exist")
    from gantry.cosmos import is_cosmos_script  # gantry.cosmos imports nothing of gantry.data

    if is_cosmos_script(path):
        if config is None:  # its Config would hold cosmos-rl's defaults, not the run's values
            raise DatasetScriptError(
                f"{path} is a cosmos-rl script: load it with the run's config (config=...)"
            )
        return _load_cosmos(path, need_rewards, config, model_path, config_source)
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses and pickling look the module up here
    call_user_code(f"{path}: importing the dataset script", spec.loader.exec_module, module)
    get_dataset = getattr(module, "get_dataset", None)
    if not callable(get_dataset):
        raise DatasetScriptError(
            f"{path}: defines no function get_dataset(config); add one that returns a list of "
            "samples (dicts with 'messages' or 'prompt')"
        )
    reward_fns = list(getattr(module, "reward_fns", []) or [])
    if need_rewards and not reward_fns:
        raise DatasetScriptError(
            f"{path}: GRPO needs reward functions: define reward_fns = [fn, ...] with "
            "fn(completion: str, sample: dict, **kw) -> float"
        )
    for fn in reward_fns:
        if not callable(fn):
            raise DatasetScriptError(f"{path}: reward_fns holds {fn!r}, which is not callable")
    get_val_dataset = getattr(module, "get_val_dataset", None)
    if get_val_dataset is not None and not callable(get_val_dataset):
        raise DatasetScriptError(f"{path}: get_val_dataset is {get_val_dataset!r}, not a function")
    return DatasetScript(path, get_dataset, reward_fns, get_val_dataset)


def _load_cosmos(path: Path, need_rewards: bool, config, model_path, config_source):
    from gantry.cosmos import load_cosmos_script

    parts = call_user_code(
        f"{path}: running the cosmos-rl script as __main__",
        lambda: load_cosmos_script(
            path, config=config, model_path=model_path, config_source=config_source
        ),
    )
    if need_rewards and not parts.reward_fns:
        raise DatasetScriptError(
            f"{path}: GRPO needs launch_worker(reward_fns=[...]); Gantry does not provide "
            "cosmos-rl's built-in rewards (train_policy.reward_function)"
        )
    return DatasetScript(path, parts.get_dataset, parts.reward_fns, parts.get_val_dataset)


def prompt_messages(sample: Any, path: Path | str = "", index: int = 0) -> list[dict]:
    """The chat messages a model is prompted with: those before the last assistant turn (the
    reference answer), or all of them when there is none."""
    if isinstance(sample, dict):
        messages = sample.get("messages")
        if isinstance(messages, list) and messages:
            last = len(messages) - 1
            if isinstance(messages[last], dict) and messages[last].get("role") == "assistant":
                if last == 0:
                    raise DatasetScriptError(
                        f"{path}: sample {index} has only an assistant message: no prompt"
                    )
                return messages[:last]
            return messages
        if isinstance(sample.get("prompt"), str):
            return [{"role": "user", "content": sample["prompt"]}]
    raise DatasetScriptError(
        f"{path}: sample {index} is {_short(sample)}; a sample must be a dict with 'messages' "
        "(a list of {'role', 'content'} dicts) or 'prompt' (a string)"
    )


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _user_traceback(exc: BaseException) -> str:
    """The traceback frames from the user's script, not Gantry's."""
    frames = traceback.extract_tb(exc.__traceback__)
    lines = traceback.format_list([f for f in frames if "gantry/data/plugin.py" not in f.filename])
    return "".join(lines).rstrip()
