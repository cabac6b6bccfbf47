"""Checkpoint and export directories of a run: naming, the completion marker, the latest
complete one, pruning. Imports no torch: the controller uses it.

A checkpoint is `<run_dir>/checkpoints/step_<N>/`:
    policy/           torch.distributed.checkpoint files written by every policy rank
    controller.json   the controller's state at step N (prompts consumed, policy version, ...)
    COMPLETE          written last, atomically, by the controller once both parts are on disk
A directory without COMPLETE is a checkpoint that was still being written when the run
stopped: it is never resumed from, and pruning deletes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def step_of(path: Path) -> int | None:
    """N for a directory named step_N, else None."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def step_dirs(root: Path) -> list[Path]:
    """The step_N directories under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(path: Path, step: int) -> None:
    write_json_atomic(Path(path) / COMPLETE, {"step": step, "time": time.time()})


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in step_dirs(root) if is_complete(p)]


def latest_complete(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune_step_dirs(
    root: Path, keep: int, *, complete_only: bool, keep_paths: set[Path] | frozenset = frozenset()
) -> list[Path]:
    """Keep the `keep` newest step_N directories (-1: all); returns the deleted ones.

    With complete_only, only complete checkpoints count towards `keep`, and an incomplete one
    older than the newest complete checkpoint (a save that never finished) is deleted too;
    an incomplete one newer than that may still be in progress and is left alone.
    Directories in `keep_paths` (still being uploaded, say) are never deleted.
    """
    dirs = step_dirs(root)
    kept = [p for p in dirs if is_complete(p)] if complete_only else dirs
    doomed = [] if keep < 0 else kept[: max(0, len(kept) - keep)]
    if complete_only and kept:
        newest = step_of(kept[-1])
        doomed += [p for p in dirs if not is_complete(p) and step_of(p) < newest]
    protected = {Path(p).resolve() for p in keep_paths}
    doomed = [p for p in doomed if p.resolve() not in protected]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(doomed, key=step_of)
