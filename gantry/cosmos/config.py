"""cosmos-rl's `Config` for scripts: attribute access to the whole run config under cosmos-rl's names.

The tree is, from weakest to strongest: cosmos-rl defaults for keys scripts read that Gantry has
no use for (`train.train_policy.dataset.*`, `validation.dataset`, ...), the user's raw TOML (keys
Gantry does not use are kept), Gantry's resolved values; then the keys that moved between
cosmos-rl releases are filled in under both names (`train.enable_validation` and
`validation.enable`, ...). `Config.from_dict(d)` lays `d` over that tree, so a script that reads
its own `--config` file sees the same values.
"""

from __future__ import annotations

import copy
import datetime
import os
from typing import Any

from gantry.config.loader import table_to_toml

_DATASET = {"name": "", "subset": "", "revision": "", "split": [], "local_dir": ""}

DEFAULTS: dict[str, Any] = {
    "custom": {},
    "redis": "",
    "eth_ips": "",
    "mode": "disaggregated",
    "train": {
        "timestamp": "",
        "output_dir": "./outputs",
        "epsilon": 1e-6,
        "compile": False,
        "train_policy": {
            "dataset": _DATASET,
            "prompt_column_name": "",
            "response_column_name": "",
            "conversation_column_name": "conversations",
            "system_prompt": "",
            "enable_dataset_cache": False,
        },
    },
    "validation": {"dataset": _DATASET, "reward_function": []},
    "profiler": {"enable_profiler": False, "enable_nsys": False},
}

_GRPO_KEYS = ("temperature", "epsilon_low", "epsilon_high", "kl_beta", "use_remote_reward")

# (PINNED name, CURRENT name): cosmos-rl commit 4f5b0eda moved validation under [validation].
MOVED = [
    ("train.enable_validation", "validation.enable"),
    ("train.validation_step", "validation.freq"),
    ("train.validation_batch_per_replica", "validation.batch_size"),
    ("rollout.val_batch_size", "validation.batch_size"),
    ("train.train_policy.fully_on_policy", "train.train_policy.on_policy"),
]


def merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`, table by table (copies; neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _lookup(tree: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _place(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def cosmos_tree(resolved: dict | None, raw: dict | None = None) -> dict:
    """The run config as cosmos-rl names it (see the module docstring)."""
    tree = merge(merge(DEFAULTS, raw or {}), resolved or {})
    policy = tree["train"]["train_policy"]
    if (raw or resolved) and "type" not in policy:  # cosmos-rl's `preprocess`
        policy["type"] = "grpo" if any(key in policy for key in _GRPO_KEYS) else "sft"
    for old, new in MOVED:
        has_new, value = _lookup(tree, new)
        has_old, old_value = _lookup(tree, old)
        if has_new:
            _place(tree, old, value)
        elif has_old:
            _place(tree, new, old_value)
    return tree


class ConfigNode:
    """A table of the config: `node.key`, `node["key"]`, `node.get(key)`, `model_dump()`."""

    def __init__(self, data: dict, where: str = "") -> None:
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_where", where)

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name.startswith("__") or name not in data:
            where = object.__getattribute__(self, "_where")
            raise AttributeError(f"config has no key {where}{name}")
        return self._wrap(name, data[name])

    def _wrap(self, name: str, value: Any) -> Any:
        if isinstance(value, dict):
            return ConfigNode(value, f"{self._where}{name}.")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._data[name] = value.model_dump() if isinstance(value, ConfigNode) else value

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, self._data[key])

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self):
        return iter(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigNode) and other._data == self._data

    def __repr__(self) -> str:
        return f"Config({self._data!r})"

    def get(self, key: str, default: Any = None) -> Any:
        return self._wrap(key, self._data[key]) if key in self._data else default

    def keys(self):
        return self._data.keys()

    def items(self):
        return [(key, self[key]) for key in self._data]

    def model_dump(self, **_ignored: Any) -> dict:
        return copy.deepcopy(self._data)


def config_class(base_tree: dict) -> type:
    """cosmos-rl's `Config` bound to this run's tree: `Config.from_dict(d)` lays `d` on it."""

    class Config(ConfigNode):
        @classmethod
        def from_dict(cls, data: dict) -> Config:
            tree = cosmos_tree(None, merge(base_tree, data))
            train = tree["train"]
            if not train.get("timestamp"):  # as cosmos-rl: a run directory per start
                train["timestamp"] = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
                train["output_dir"] = os.path.join(train["output_dir"], train["timestamp"])
            return cls(tree)

        @classmethod
        def model_validate(cls, data: dict) -> Config:
            return cls(cosmos_tree(None, merge(base_tree, data)))

    return Config


to_toml = table_to_toml  # the config's TOML writer: one for Gantry's and the script's
