"""cosmos-rl datasets and reward functions as Gantry samples and reward callables.

- A dataset is an object or a factory (any callable, called with the `Config`). Its `setup` is
  called as cosmos-rl's `util.call_setup` does: `setup(config)` or `setup(config, tokenizer)`,
  by the number of required positional parameters.
- GRPO: item `dataset[i]` (a prompt string, a conversation, or a dict with "messages" /
  "conversation(s)" / "prompt") becomes `{"messages" | "prompt", "reference":
  dataset.get_reference_answer(i), "cosmos_prompt": item}`.
- SFT: item `dataset[i]` (a conversation, or a dict holding one) becomes `{"messages": ...}`.
- Rewards: `fn(completion, reference, prompt=, data_packer=, config=, tokenizer=)` (only the
  keywords it accepts, all of them if it takes **kwargs); a float or `(float, info)`; items
  may be `(fn, weight)`; summed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class CosmosError(ValueError):
    pass


def accepts(fn: Callable) -> tuple[set[str], bool]:
    """The keyword names `fn` accepts, and whether it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


class LazyTokenizer:
    """The model's tokenizer, loaded on first use (attribute, call or len()), so that a
    dataset or reward that never uses it needs no model."""

    def __init__(self, model: str) -> None:
        self._model, self._loaded = model, None

    def get(self) -> Any:
        if self._loaded is None:
            if not self._model or self._model.startswith("gantry:"):
                raise CosmosError(
                    f"the dataset script uses the model's tokenizer, but the model "
                    f"{self._model!r} is not resolved to a directory: pass model_path to "
                    "load_dataset_script"
                )
            from transformers import AutoTokenizer

            self._loaded = AutoTokenizer.from_pretrained(self._model, trust_remote_code=True)
        return self._loaded

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.get(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.get()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.get())


class Samples(Sequence):
    """Gantry samples over a cosmos-rl dataset, mapped on access; pickled as a plain list."""

    def __init__(self, dataset: Any, indices: Sequence[int], convert: Callable) -> None:
        self.dataset, self.indices, self.convert = dataset, indices, convert

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.convert(self.dataset, self.indices[i])

    def __reduce__(self):
        return (list, (list(self),))


class CosmosData:
    """The datasets and rewards a cosmos-rl script handed to `launch_worker`."""

    def __init__(self, path: Path, config: Any, model: str, args: dict, grpo: bool = True) -> None:
        """`grpo`: the run's type (True when unknown: items may then be either kind)."""
        self.path, self.config, self.args = path, config, args
        self.tokenizer = LazyTokenizer(model)
        self.grpo = grpo
        self.packer = args.get("data_packer")
        self.val_packer = args.get("val_data_packer") or self.packer
        self._made: dict[str, Any] = {}

    def _dataset(self, name: str) -> Any:
        if name not in self._made:
            dataset = self.args.get(name)
            if isinstance(dataset, type) or (callable(dataset) and not hasattr(dataset, "__len__")):
                dataset = dataset(self.config)
            if hasattr(dataset, "setup"):
                self._setup(dataset)
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise CosmosError(
                    f"{self.path}: launch_worker({name}=...) gave {type(dataset).__name__}, "
                    "which has no len() and [i]; give a torch Dataset or a factory returning one"
                )
            self._made[name] = dataset
        return self._made[name]

    def _setup(self, dataset: Any) -> None:
        params = inspect.signature(dataset.setup).parameters.values()
        required = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
        if len(required) == 1:
            dataset.setup(self.config)
        elif len(required) == 2:
            dataset.setup(self.config, self.tokenizer)
        else:
            raise CosmosError(
                f"{self.path}: {type(dataset).__name__}.setup takes {len(required)} required "
                "arguments; cosmos-rl calls setup(config) or setup(config, tokenizer)"
            )

    def train_samples(self, _custom: dict) -> Sequence:
        if self.args.get("dataset") is None:
            raise CosmosError(f"{self.path}: launch_worker(...) was given no dataset")
        dataset = self._dataset("dataset")
        indices = range(len(dataset))
        if not self.grpo and self._split_val():
            indices = range(self._val_count(len(dataset)), len(dataset))
        return Samples(dataset, indices, self._convert("train"))

    def val_getter(self) -> Callable[[dict], Sequence] | None:
        if self.args.get("val_dataset") is None and (self.grpo or not self._split_val()):
            return None
        return self.val_samples

    def val_samples(self, _custom: dict) -> Sequence:
        if self.args.get("val_dataset") is not None:
            dataset = self._dataset("val_dataset")
            return Samples(dataset, range(len(dataset)), self._convert("val"))
        dataset = self._dataset("dataset")  # cosmos-rl: the first test_size items of train
        return Samples(dataset, range(self._val_count(len(dataset))), self._convert("val"))

    def _split_val(self) -> bool:
        return self.args.get("val_dataset") is None and bool(self.config.validation.get("enable"))

    def _val_count(self, size: int) -> int:
        test_size = self.config.train.train_policy.dataset.get("test_size")
        count = round(size * (0.1 if test_size is None else test_size))
        if isinstance(test_size, int) and not isinstance(test_size, bool):
            count = test_size
        return min(max(count, 1), max(size - 1, 1))

    def _convert(self, split: str) -> Callable[[Any, int], dict]:
        def convert(dataset: Any, index: int) -> dict:
            item = dataset[index]
            if not self.grpo:
                return {"messages": _conversation(item, self.path, index, sft=True)}
            sample = _prompt_sample(item, self.path, index)
            getter = getattr(dataset, "get_reference_answer", None)
            sample["reference"] = getter(index) if callable(getter) else ""
            sample["cosmos_prompt"], sample["cosmos_split"] = item, split
            return sample

        return convert

    def reward_fns(self) -> list[Callable[..., float]]:
        if not self.grpo:
            return []
        train = _weighted(self.args.get("reward_fns"), self.path, "reward_fns")
        val = _weighted(self.args.get("val_reward_fns"), self.path, "val_reward_fns") or train
        if not train:
            return []  # the caller says GRPO needs them

        def cosmos_reward_fns(completion: str, sample: dict) -> float | tuple[float, dict]:
            is_val = sample.get("cosmos_split") == "val"
            fns, packer = (val, self.val_packer) if is_val else (train, self.packer)
            total, infos = 0.0, {}
            for fn, weight in fns:
                value, info = self._call_reward(fn, completion, sample, packer)
                total += weight * value
                infos.update(info)  # cosmos-rl merges the functions' dicts the same way
            return (total, infos) if infos else total

        return [cosmos_reward_fns]

    def _call_reward(
        self, fn: Callable, completion: str, sample: dict, packer: Any
    ) -> tuple[float, dict]:
        """The function's value and its info (cosmos-rl's reward components, logged as
        `reward_info/<key>`; empty when it returns a bare float)."""
        names, takes_any = accepts(fn)
        offered = {
            "config": lambda: self.config,
            "tokenizer": lambda: self.tokenizer,
            "prompt": lambda: sample.get("cosmos_prompt"),
            "data_packer": lambda: packer,
        }
        kwargs = {k: make() for k, make in offered.items() if takes_any or k in names}
        value, info = fn(completion, sample.get("reference"), **kwargs), {}
        if isinstance(value, tuple) and len(value) == 2:
            value, info = value  # (reward, info): the info is cosmos-rl's metrics
        name = getattr(fn, "__name__", fn)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CosmosError(
                f"{self.path}: reward function {name} returned {value!r}; return a float or "
                "(float, info)"
            )
        if not isinstance(info, dict):
            raise CosmosError(
                f"{self.path}: reward function {name} returned info {info!r:.80}; the second "
                "value of (float, info) must be a dict, as cosmos-rl requires"
            )
        return float(value), info


def _weighted(fns: Any, path: Path, name: str) -> list[tuple[Callable, float]]:
    if fns is None:
        return []
    out = []
    for item in fns if isinstance(fns, list | tuple) else [fns]:
        fn, weight = item if isinstance(item, tuple) else (item, 1.0)
        if not callable(fn):
            raise CosmosError(f"{path}: launch_worker({name}=...) holds {fn!r}, not a function")
        out.append((fn, float(weight)))
    return out


def _conversation(item: Any, path: Path, index: int, sft: bool) -> list:
    if isinstance(item, dict):
        for key in ("messages", "conversations", "conversation"):
            if isinstance(item.get(key), list):
                return _text_parts_joined(item[key])
    if isinstance(item, list) and all(isinstance(m, dict) and "role" in m for m in item):
        return _text_parts_joined(item)
    what = "an SFT item" if sft else "a prompt"
    raise CosmosError(
        f"{path}: dataset[{index}] is {repr(item)[:200]}; {what} must be a conversation (a list "
        "of {'role', 'content'} dicts) or a dict holding one under 'messages' or 'conversations'"
        + ("" if sft else ", or a string")
    )


def _text_parts_joined(messages: list) -> list:
    """Messages whose content is only text parts get it as one string (a copy): a text-only
    model's chat template (Qwen2.5's) concatenates `content` as a string, while a VLM's renders
    the parts one after the other, with nothing between them, which is the same text."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            message = {**message, "content": "".join(p["text"] for p in content)}
        out.append(message)
    return out


def _prompt_sample(item: Any, path: Path, index: int) -> dict:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return {"prompt": item["prompt"]}
    return {"messages": _conversation(item, path, index, sft=False)}
