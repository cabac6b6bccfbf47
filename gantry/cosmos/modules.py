"""The `cosmos_rl` modules a cosmos-rl script imports, built by Gantry for one script run.

They are module objects put in `sys.modules` only while the script runs as `__main__`
(`provided(...)`); a `cosmos_rl.*` name Gantry does not provide fails with a message that lists
what is provided. A real `cosmos_rl` installed beside Gantry is shadowed for the script (one log
line says so) and put back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gantry.cosmos.packers import BUILTIN, HFVLMDataPacker
from gantry.cosmos.rewards import PROVIDED as REWARDS

log = logging.getLogger("gantry.cosmos")
_said_shadowed = False


class LaunchCall:
    """What the script handed to `launch_worker(...)` (the last call wins)."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        names = ["dataset", "data_packer", "reward_fns", "val_dataset", "val_reward_fns"]
        names.append("val_data_packer")  # PINNED's positional order
        self.kwargs = {**dict(zip(names, args, strict=False)), **kwargs}


def basename_from_modelpath(path: str) -> str:
    """cosmos-rl's util: the last two components of a model path or repo id, joined by '/'."""
    return "/".join(Path(path.rstrip("/")).parts[-2:])


def setup_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)


def _module(name: str, doc: str, **names: Any) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(names)
    module.__path__ = []  # a package: sub-modules resolve through sys.modules

    def missing(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(
            f"{name}.{attr} is not provided by Gantry's cosmos-rl layer (provided: "
            f"{', '.join(sorted(n for n in names if not n.startswith('_'))) or 'nothing'}); "
            "see docs/cosmos-rl.md"
        )

    module.__getattr__ = missing
    return module


def build(config_cls: type, launch: LaunchCall) -> dict[str, types.ModuleType]:
    """Every module the layer provides, by name."""
    packer_names = {cls.__name__: cls for cls in BUILTIN}
    util = _module(
        "cosmos_rl.utils.util",
        "cosmos-rl helpers",
        basename_from_modelpath=basename_from_modelpath,
        setup_tokenizer=setup_tokenizer,
    )
    mods = {
        "cosmos_rl": _module("cosmos_rl", "Gantry's cosmos-rl compatibility layer"),
        "cosmos_rl.launcher": _module("cosmos_rl.launcher", ""),
        "cosmos_rl.launcher.worker_entry": _module(
            "cosmos_rl.launcher.worker_entry", "", main=launch
        ),
        "cosmos_rl.policy": _module("cosmos_rl.policy", ""),
        "cosmos_rl.policy.config": _module(
            "cosmos_rl.policy.config", "", Config=config_cls, DatasetConfig=config_cls
        ),
        "cosmos_rl.dispatcher": _module("cosmos_rl.dispatcher", ""),
        "cosmos_rl.dispatcher.algo": _module("cosmos_rl.dispatcher.algo", ""),
        "cosmos_rl.dispatcher.algo.reward": _module(
            "cosmos_rl.dispatcher.algo.reward", "cosmos-rl's built-in rewards", **REWARDS
        ),
        "cosmos_rl.dispatcher.data": _module("cosmos_rl.dispatcher.data", ""),
        "cosmos_rl.dispatcher.data.packer": _module(
            "cosmos_rl.dispatcher.data.packer", "", **packer_names
        ),
        "cosmos_rl.dispatcher.data.packer.base": _module(
            "cosmos_rl.dispatcher.data.packer.base", "", **packer_names
        ),
        "cosmos_rl.dispatcher.data.packer.hf_vlm_data_packer": _module(
            "cosmos_rl.dispatcher.data.packer.hf_vlm_data_packer",
            "",
            HFVLMDataPacker=HFVLMDataPacker,
        ),
        "cosmos_rl.utils": _module("cosmos_rl.utils", "", util=util),
        "cosmos_rl.utils.logging": _module(
            "cosmos_rl.utils.logging", "", logger=logging.getLogger("cosmos")
        ),
        "cosmos_rl.utils.util": util,
    }
    for name, module in mods.items():  # `import a.b.c` binds a, and reads a.b.c as attributes
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, module)
    return mods


class _Refuse(importlib.abc.MetaPathFinder):
    """Any `cosmos_rl.*` module the layer does not provide: a clear error, never the real one."""

    def __init__(self, provided: dict[str, types.ModuleType]) -> None:
        self.provided = provided

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name == "cosmos_rl" or name.startswith("cosmos_rl."):
            raise ModuleNotFoundError(
                f"{name} is not provided by Gantry's cosmos-rl layer (provided: "
                f"{', '.join(sorted(self.provided))}); see docs/cosmos-rl.md",
                name=name,
            )
        return None


@contextlib.contextmanager
def provided(mods: dict[str, types.ModuleType]) -> Iterator[None]:
    """`mods` in sys.modules (and no other cosmos_rl module) while the block runs."""
    global _said_shadowed
    saved = {n: m for n, m in sys.modules.items() if n == "cosmos_rl" or n.startswith("cosmos_rl.")}
    if not _said_shadowed and (saved or importlib.util.find_spec("cosmos_rl") is not None):
        log.info(
            "a cosmos_rl package is installed: Gantry's cosmos-rl layer replaces it for the script"
        )
        _said_shadowed = True
    for name in saved:
        del sys.modules[name]
    sys.modules.update(mods)
    finder = _Refuse(mods)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "cosmos_rl" or n.startswith("cosmos_rl.")]:
            del sys.modules[name]
        sys.modules.update(saved)
