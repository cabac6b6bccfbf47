"""The launcher's pre-start check of a dataset script: it loads, and how many samples it has.

A script written for cosmos-rl imports torch, which the launcher does not (it must start fast
and stay light), so such a script is checked in a child process,
`python -m gantry.data.script_check`; any other script is checked in this process.

    path, size = check_dataset_script(args.dataset, config=config, need_rewards=grpo,
                                      validation=not grpo and config.validation.enable,
                                      model_path=model_path, config_source=args.config)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gantry.config import read_resolved_config, write_resolved_config
from gantry.cosmos import is_cosmos_script
from gantry.data.plugin import DatasetScriptError, load_dataset_script
from gantry.data.rewards import RewardSet


def check_dataset_script(
    path: str | Path,
    *,
    config: Any,
    need_rewards: bool,
    validation: bool,
    model_path: str | None = None,
    config_source: str | Path | None = None,
) -> tuple[Path, int]:
    """The script's resolved path and its number of training samples; DatasetScriptError if it
    cannot be used (its validation samples are loaded too when `validation`)."""
    path = Path(path).resolve()
    if not path.is_file() or not is_cosmos_script(path):
        return path, _count(path, config, need_rewards, validation, model_path, config_source)
    with tempfile.TemporaryDirectory(prefix="gantry-script-check-") as tmp:
        resolved, result = Path(tmp) / "config.json", Path(tmp) / "size"
        write_resolved_config(config, resolved)
        command = [sys.executable, "-m", "gantry.data.script_check", str(path)]
        command += ["--config", str(resolved), "--result", str(result)]
        command += ["--model-path", model_path or ""]
        command += ["--config-source", str(config_source or "")]
        command += ["--need-rewards"] * need_rewards + ["--validation"] * validation
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not result.is_file():
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            marked = [line for line in lines if line.startswith("error: ")]
            raise DatasetScriptError(
                "\n".join(line.removeprefix("error: ") for line in marked) or "\n".join(lines)
            )
        return path, int(result.read_text())


def _count(path, config, need_rewards, validation, model_path, config_source) -> int:
    script = load_dataset_script(
        path,
        need_rewards=need_rewards,
        config=config,
        model_path=model_path,
        config_source=config_source,
    )
    size = len(script.load_samples(config.custom))
    if need_rewards:  # reward_function's names, overlong shaping: checked before any worker
        RewardSet(script, config.train.train_policy, config.rollout.max_response_length)
    if validation:
        script.load_val_samples(config.custom)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script")
    parser.add_argument("--config", required=True, help="the resolved config (JSON)")
    parser.add_argument("--result", required=True, help="file to write the sample count to")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--config-source", default="")
    parser.add_argument("--need-rewards", action="store_true")
    parser.add_argument("--validation", action="store_true")
    args = parser.parse_args(argv)
    config = read_resolved_config(args.config)
    try:
        size = _count(
            Path(args.script),
            config,
            args.need_rewards,
            args.validation,
            args.model_path or None,
            args.config_source or None,
        )
    except DatasetScriptError as exc:
        print("\n".join(f"error: {line}" for line in str(exc).splitlines()), file=sys.stderr)
        return 2
    Path(args.result).write_text(str(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
