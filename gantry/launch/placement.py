"""Where a run's processes go and where it starts from, decided once by the launcher.

`resolve_parallelism` fills in `policy.parallelism.dp_shard_size = -1` (all the node's devices
that the rollout replicas leave free) and checks that the policy and rollout processes fit the
devices of this machine; `find_resume_checkpoint` turns `train.resume` into a complete
checkpoint directory. Both raise LaunchError with what to change. `rollout_dtype` resolves
`rollout.dtype = "auto"`. Imports no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from pydantic import ValidationError

from gantry.config import ConfigError, GantryConfig, describe_errors
from gantry.launch.nodes import shares_one_gpu
from gantry.run import checkpoints


class LaunchError(ValueError):
    """Bad input found before any worker started."""


def count_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def resolve_parallelism(config: GantryConfig, gpus: int | None = None) -> GantryConfig:
    """The config with dp_shard_size resolved, after checking that the processes fit."""
    gpus = count_gpus() if gpus is None else gpus
    parallel = config.policy.parallelism
    rollout_devices = (
        config.rollout.parallelism.n_init_replicas * config.rollout.parallelism.tp_size
        if config.train.train_policy.type == "grpo" and not shares_one_gpu(config, gpus)
        else 0  # SFT starts no rollout replicas; a shared GPU is the policy's too
    )
    replicas = parallel.n_init_replicas * parallel.dp_replicate_size
    shard = parallel.dp_shard_size
    if shard == -1:
        free = gpus - rollout_devices if gpus else replicas  # CPU: one rank per replica
        shard = free // replicas
        if shard < 1:
            raise LaunchError(
                f"policy.parallelism.dp_shard_size = -1 leaves no GPU for the policy: {gpus} "
                f"GPUs, {rollout_devices} taken by rollout replicas; set dp_shard_size or use "
                "fewer rollout replicas"
            )
    policy_devices = replicas * shard
    if gpus and policy_devices + rollout_devices > gpus:
        raise LaunchError(
            f"the run needs {policy_devices} policy GPUs (policy.parallelism: n_init_replicas "
            f"x dp_replicate_size x dp_shard_size) + {rollout_devices} rollout GPUs "
            f"(rollout.parallelism: n_init_replicas x tp_size), but this node has {gpus}; "
            "lower them, or launch on more nodes"
        )
    data = config.model_dump(mode="python")
    data["policy"]["parallelism"]["dp_shard_size"] = shard
    try:  # the batch rules that depend on the number of ranks apply now
        return GantryConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def rollout_dtype(setting: str, model_path: str | Path, on_gpu: bool) -> str:
    """The dtype of `rollout.dtype`, resolved the same way by the policy (which sends weights
    in it) and the rollout engine (which computes in it)."""
    if setting != "auto":
        return setting
    if not on_gpu:
        # CPUs without bfloat16 units run float32 faster, and it matches a float32 policy.
        return "float32"
    config = json.loads((Path(model_path) / "config.json").read_text())
    text = config.get("text_config") or {}
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "float32"
    return "bfloat16" if dtype == "float32" else dtype


def find_resume_checkpoint(resume: bool | str, output_dir: Path) -> Path | None:
    """The complete checkpoint `train.resume` designates; None to start afresh."""
    if resume is False:
        return None
    if resume is True:
        found = [c for run in _run_dirs(output_dir) if (c := _latest_of(run)) is not None]
        if not found:
            print(
                f"train.resume = true: no complete checkpoint under {output_dir}; starting afresh"
            )
            return None
        return max(found, key=lambda c: (c / checkpoints.COMPLETE).stat().st_mtime)
    path = Path(resume).expanduser().resolve()
    if checkpoints.step_of(path) is not None:
        if not checkpoints.is_complete(path):
            raise LaunchError(
                f"train.resume = {resume!r}: {path} is not a complete checkpoint (no "
                f"{checkpoints.COMPLETE} marker: its save never finished); pick another step"
            )
        return path
    latest = _latest_of(path)
    if latest is None:
        raise LaunchError(
            f"train.resume = {resume!r}: no complete checkpoint in {path} (give a run directory "
            "or its checkpoints/step_N directory)"
        )
    return latest


def _run_dirs(output_dir: Path) -> list[Path]:
    return [p for p in Path(output_dir).iterdir() if p.is_dir()] if output_dir.is_dir() else []


def _latest_of(run_dir: Path) -> Path | None:
    return checkpoints.latest_complete(Path(run_dir) / checkpoints.CHECKPOINTS)
