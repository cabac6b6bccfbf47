"""Running a cosmos-rl script and mapping its `launch_worker(...)` onto Gantry's dataset API.

    parts = load_cosmos_script(path, config=resolved_config, model_path=model_dir)
    parts.get_dataset(custom) -> samples; parts.reward_fns; parts.get_val_dataset

The script runs as `__main__` with `sys.argv = [script, "--config", <the run config as TOML>]`
and the `cosmos_rl` modules of `gantry.cosmos.modules`. `launch_worker` records its arguments.
"""

from __future__ import annotations

import ast
import atexit
import os
import sys
import tempfile
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gantry.cosmos.config import config_class, cosmos_tree, to_toml
from gantry.cosmos.modules import LaunchCall, build, provided
from gantry.cosmos.packers import PackerError, check_packer
from gantry.cosmos.samples import CosmosData, CosmosError

UNSUPPORTED = (
    "dataloader",
    "sampler",
    "batch_sampler",
    "val_sampler",
    "val_batch_sampler",
    "filter_reward_fns",
    "custom_logger_fns",
    "hook_fns",
)


@dataclass
class CosmosParts:
    get_dataset: Callable[[dict], Any]
    reward_fns: list[Callable[..., float]]
    get_val_dataset: Callable[[dict], Any] | None


def is_cosmos_script(path: Path) -> bool:
    """Whether the script imports `cosmos_rl` (read, not run)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return False  # the ordinary import reports it
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n == "cosmos_rl" or n.startswith("cosmos_rl.") for n in names):
            return True
    return False


def load_cosmos_script(
    path: Path,
    *,
    config: Any = None,
    model_path: str | None = None,
    config_source: str | Path | None = None,
) -> CosmosParts:
    """Run the script as `__main__` and map what it gave `launch_worker` (CosmosError if it
    cannot be mapped). `config`: the run's resolved GantryConfig (None: cosmos-rl's defaults);
    `model_path`: the model's local directory or repo id (default policy.model_name_or_path);
    `config_source`: the user's TOML, whose keys Gantry does not use are kept for the script."""
    raw = tomllib.loads(Path(config_source).read_text("utf-8")) if config_source else None
    resolved = config.model_dump(mode="python") if config is not None else None
    tree = cosmos_tree(resolved, raw)
    config_cls = config_class(tree)
    launch = LaunchCall()
    source = path.read_text(encoding="utf-8")
    _run_as_main(path, source, build(config_cls, launch), _toml_file(tree))
    if launch.kwargs is None:
        raise CosmosError(
            f"{path}: ran as __main__ but never called launch_worker(...); call it under "
            "`if __name__ == '__main__':` as cosmos-rl scripts do"
        )
    args = launch.kwargs
    given = [name for name in UNSUPPORTED if args.get(name) is not None]
    if given:
        raise CosmosError(
            f"{path}: launch_worker({given[0]}=...) is not supported by Gantry; remove it "
            "(see docs/cosmos-rl.md)"
        )
    for name in ("data_packer", "val_data_packer"):
        try:
            check_packer(args.get(name), name, source)
        except PackerError as exc:
            raise CosmosError(f"{path}: {exc}") from None
    model = model_path or tree.get("policy", {}).get("model_name_or_path", "")
    known = config is not None or raw is not None
    grpo = not known or tree["train"]["train_policy"]["type"] != "sft"
    data = CosmosData(path, config_cls.from_dict({}), model, args, grpo)
    return CosmosParts(data.train_samples, data.reward_fns(), data.val_getter())


def _toml_file(tree: dict) -> str:
    handle, name = tempfile.mkstemp(prefix="cosmos-config-", suffix=".toml")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(to_toml(tree))
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return name


def _run_as_main(path: Path, source: str, mods: dict, toml_path: str) -> None:
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    module.__builtins__ = __builtins__
    saved_main, saved_argv = sys.modules.get("__main__"), sys.argv
    sys.modules["__main__"] = module
    sys.argv = [str(path), "--config", toml_path]
    sys.path.insert(0, str(path.parent))  # as `python script.py` would
    try:
        with provided(mods):
            exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102
    except ImportError as exc:
        raise _named_import_error(exc, mods) from None
    finally:
        sys.path.remove(str(path.parent))
        sys.argv = saved_argv
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    _KEEP.append(module)  # the script's functions keep running after this


_KEEP: list[types.ModuleType] = []


def _named_import_error(exc: ImportError, mods: dict) -> ImportError:
    """`from cosmos_rl.x import name` of a name the layer lacks: Python's bare "cannot import
    name" becomes one that lists what the layer provides in that module."""
    module = mods.get(exc.name or "")
    if module is None or "cannot import name" not in str(exc):
        return exc
    names = sorted(
        n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, type(sys))
    )
    return ImportError(
        f"{exc.msg.split(' (')[0]}: not provided by Gantry's cosmos-rl layer (provided in "
        f"{exc.name}: {', '.join(names) or 'nothing'}); see docs/cosmos-rl.md",
        name=exc.name,
    )
