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

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from gantry.run.errors import disk_full_error, free_bytes, is_disk_full

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
    """Write JSON so that a reader sees the old file or the whole new one, never a part. On a
    full disk the temporary file is removed and DiskFullError names the path."""
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, indent=2) + "\n"
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, len(text.encode())) from exc
        raise
    os.replace(tmp, path)


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` (whole lines) to `path` entirely or not at all: a write cut short (a full
    disk) is truncated back to where the file ended, so that a reader never sees a partial
    last line; then DiskFullError (or the OSError) is raised."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # a write may take less than asked when the disk fills
                view = view[os.write(fd, view) :]
        except OSError as exc:
            os.ftruncate(fd, end)
            if is_disk_full(exc):
                raise disk_full_error(path, len(data)) from exc
            raise
    finally:
        os.close(fd)


def trim_partial_line(path: Path) -> int:
    """Cut a last line without its newline (left by a writer that died mid-write) off `path`;
    the bytes removed."""
    if not path.is_file():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep = size
        while keep > 0:
            start = max(0, keep - 4096)
            f.seek(start)
            newline = f.read(keep - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < size:
            f.truncate(keep)
        return size - keep


def failed_for_room(path: Path, needed: int, error: BaseException | None) -> bool:
    """Whether a write of `needed` bytes under `path` failed for want of room. torch.save
    reports a full disk as a RuntimeError without errno ("unexpected pos"), so a failed write
    with less free than it still had to write counts as one too."""
    if error is None:
        return False
    return is_disk_full(error) or free_bytes(path) < needed - tree_bytes(path)


def tree_bytes(path: Path) -> int:
    """The bytes of the files under `path` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walk
                total += os.lstat(os.path.join(root, name)).st_size
    return total


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
