"""Resumable policy checkpoints: save and load the trainer state with torch.distributed.checkpoint.

The trainer state of a policy rank is the FSDP2 model, its optimizer, the LR scheduler, the step,
the rank's RNG states and a small JSON-able `extra` dict. Model and optimizer state are saved
shard by shard (each rank writes its own DTensor shards, nothing is gathered) and can be loaded
by a different number of ranks; the RNG states are per rank and cannot (see `load`).

    ckpt = PolicyCheckpointer(async_mode=True)          # once per policy rank, a collective
    ckpt.save(step_dir / "policy", model=m, optimizer=o, scheduler=s, step=n, extra={...})
    for path in ckpt.poll():                             # every step, on every rank
        ...                                              # `path` is durable on all ranks
    step, extra = ckpt.load(path, model=m, optimizer=o, scheduler=s)
    ckpt.close()

What is on disk, in `<run>/checkpoints/step_N/policy/` (the path given to `save`):
    __<rank>_0.distcp   each rank's data: model and optimizer shards, `trainer` (step, extra,
                        scheduler state; written once, by rank 0) and `rng/rank<r>` (rank r's
                        RNG states, written by rank r)
    .metadata           DCP's index of all ranks' data, written by rank 0 after every rank's
                        files are written and fsynced (DCP writes it to a temporary name first)
    DONE                JSON {"step", "world_size", "async", "time"}, written atomically by
                        rank 0 once the save is durable on all ranks. `load` refuses a
                        directory without it.
The controller then writes controller.json and COMPLETE next to `policy/`
(gantry.run.checkpoints.mark_complete); resume only from `latest_complete(...) / "policy"`.

When each of them exists:
- sync (`async_mode=False`): `save` returns when all ranks' files, .metadata and DONE are on
  disk; the next `poll()` (on every rank) returns the path.
- async: `save` returns once this rank's state is staged (copied off the live tensors), so
  training may go on and change them; a background writer then writes the files. The save is
  finished when a later `poll()` (non-blocking), `wait()`, `save()`, `load()` or `close()` finds
  it done on all ranks: rank 0 then writes DONE, all ranks pass a barrier, and `poll()`/`wait()`
  return the path on every rank. So when any rank sees a path returned, DONE is on disk.
At most one save is in flight: `save` first finishes the previous one (blocking).

Every method is a collective over the policy ranks: all ranks call the same methods in the
same order (`poll` included, e.g. once per training step), or they deadlock. `poll` costs one
tiny all-reduce while a save is in flight and nothing otherwise. The directory must be on a
filesystem all policy ranks share.

The background writer (bench/async_checkpoint.py measures it; figures in bench/RESULTS.md):
- "thread" (default): DCP's writer thread in the trainer process. Light (no extra process, no
  shared memory), but its Python work contends with training for the GIL.
- "process": a writer process per rank that DCP spawns at the first save and keeps; the staged
  state goes to it through shared memory (/dev/shm must hold one rank's model + optimizer
  state: containers often default to 64 MB), and the entry script must guard its code with
  `if __name__ == "__main__"` (the spawned process re-imports it; `python -m policy` does).
  It slowed training less than the thread on CPU. DCP logs each request at INFO from it.
Either way the writer runs at a raised nice value (`writer_niceness`) so that it takes the
CPU time training leaves idle rather than training's own.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from gantry.run import checkpoints as run_files
from gantry.run.checkpoints import COMPLETE, failed_for_room, is_complete, write_json_atomic
from gantry.run.errors import DiskFullError, disk_full_error, free_bytes
from policy.lora import state_dict_options as _options

log = logging.getLogger("gantry.policy")

DONE = "DONE"
# Top-level keys of the DCP state dict.
MODEL, OPTIMIZER, TRAINER, RNG = "model", "optimizer", "trainer", "rng"


class CheckpointError(RuntimeError):
    """A policy checkpoint that cannot be saved or loaded as asked."""


@dataclass
class _InFlight:
    path: Path
    step: int
    future: Future
    needed: int  # bytes the save was expected to take (the DiskFullError line says it)


def read_done(path: Path) -> dict:
    """The DONE marker of a policy checkpoint directory; CheckpointError if the save never
    finished (no marker: the process stopped while writing, or the directory is not a
    policy checkpoint)."""
    marker = Path(path) / DONE
    if not marker.is_file():
        raise CheckpointError(
            f"{path} is not a finished policy checkpoint (no {DONE} marker): its save was "
            "interrupted or it is not a checkpoint's policy/ directory. Resume from "
            "gantry.run.checkpoints.latest_complete(<run>/checkpoints) / 'policy', which only "
            f"returns checkpoints with {COMPLETE}"
        )
    return json.loads(marker.read_text())


def check_world_size(path: Path, saved: int, current: int, *, allow_reshard: bool) -> bool:
    """Whether the per-rank RNG states of a checkpoint saved by `saved` ranks can be restored
    on `current` ranks; raises CheckpointError when they cannot and `allow_reshard` is off.

    DCP reshards model and optimizer to any world size, but the RNG state of rank r has no
    meaning on a world of another size (which rank would get it?), so an exact resume needs
    the same number of ranks. With allow_reshard the rest is loaded and each rank keeps its
    current RNG state.
    """
    if saved == current:
        return True
    if not allow_reshard:
        raise CheckpointError(
            f"{path} was saved by {saved} policy ranks but this job has {current}: the per-rank "
            f"RNG states cannot be mapped onto another world size. Restart with {saved} policy "
            "ranks for an exact resume, or load with allow_reshard=True to reshard the model and "
            "optimizer and keep the current RNG states"
        )
    log.warning(
        "%s: resharding a checkpoint of %d ranks onto %d; RNG states are not restored",
        path,
        saved,
        current,
    )
    return False


def _lower_thread_priority(niceness: int) -> None:
    """Raise the nice value of the calling thread (Linux: each thread has its own) to
    `niceness`, so that the checkpoint writer gets the CPU time training leaves idle."""
    if sys.platform != "linux" or niceness <= 0:
        return
    tid = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
        os.setpriority(os.PRIO_PROCESS, tid, niceness)


class _BackgroundWriter(dcp.FileSystemWriter):
    """The FileSystemWriter of async saves. DCP calls set_up_storage_writer first thing in the
    thread (or writer process) that runs the save: there it lowers that thread's priority and,
    in a writer process, turns off torch.save's CRC32 of each record, about a third of the
    writer's CPU time. Nothing reads those CRCs: torch.load, and so DCP's reader, does not
    check them. The setting is global to a process, hence only in the writer's own process."""

    def __init__(self, path: Path, *, niceness: int, in_writer_process: bool) -> None:
        super().__init__(path)
        self.niceness = niceness
        self.in_writer_process = in_writer_process

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        _lower_thread_priority(self.niceness)
        if self.in_writer_process:
            torch.serialization.set_crc32_options(False)
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)


def _to_bytes(obj: Any) -> io.BytesIO:
    """An opaque DCP entry (not flattened into keys, not resharded): DCP pickles a BytesIO
    whole and gives the same BytesIO back on load (the pattern of torchtitan's TrainState)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _from_bytes(buf: io.BytesIO) -> Any:
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # our own pickles: RNG tuples, scheduler state


def _tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a state dict, as this rank holds them (a DTensor's local shard)."""
    if isinstance(tree, dict):
        return sum(_tensor_bytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(value) for value in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0  # the pickled extras: a few kB


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one per rank
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class PolicyCheckpointer:
    """Saves and loads the trainer state of this policy rank; one per rank, see the module doc.

    async_mode: write in the background (`save` returns after staging) or not.
    async_type: the background writer, "thread" or "process" (see the module doc).
    writer_niceness: nice value the background writer runs at (Linux; 0 leaves it alone).
    """

    def __init__(
        self,
        *,
        async_mode: bool,
        async_type: Literal["thread", "process"] = "thread",
        writer_niceness: int = 10,
    ) -> None:
        if not dist.is_initialized():
            raise CheckpointError(
                "PolicyCheckpointer needs torch.distributed: call "
                "policy.parallel.init_distributed() first"
            )
        if async_type not in ("thread", "process"):
            raise ValueError(f"async_type must be 'thread' or 'process', got {async_type!r}")
        self.async_mode = async_mode
        self.async_type = async_type
        self.writer_niceness = writer_niceness
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Two gloo groups of all ranks (creating them is a collective, hence once, here):
        # - the background writer's collectives (plan exchange, final gather) run on their own
        #   group: collectives of two threads on one group could pair up differently on each
        #   rank (gloo matches them by issue order) with training's FSDP collectives and
        #   deadlock or mix data; async_save also needs a CPU backend, which NCCL is not.
        # - the main thread's small collectives (agreeing a save is done, barriers, load
        #   planning) use another, so they never interleave with a writer in flight.
        self._write_group = dist.new_group(backend="gloo")
        self._control_group = dist.new_group(backend="gloo")
        self._stager: DefaultStager | None = None
        if async_mode:
            on_cuda = torch.cuda.is_available()
            # A persistent stager keeps its staging buffers between saves (no re-allocation);
            # staging is synchronous so that `save` returns only once the copy is complete.
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=on_cuda,
                    use_shared_memory=async_type == "process",
                    use_async_staging=False,
                    use_non_blocking_copy=on_cuda,
                )
            )
        self._inflight: _InFlight | None = None
        self._finished: list[Path] = []
        self._closed = False
        self.last_save_blocking_s = 0.0  # how long the last `save` call held the caller

    def save(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        step: int,
        extra: dict,
    ) -> None:
        """Write the trainer state to `path` (a checkpoint's policy/ directory); a collective.

        Sync: returns when the checkpoint is durable and DONE written. Async: returns after
        staging; see `poll`. A previous save still in flight is finished first.
        """
        self._check_open()
        started = time.perf_counter()
        path = Path(path)
        if is_complete(path.parent):
            raise CheckpointError(
                f"refusing to save into {path}: {path.parent} is a complete checkpoint; "
                "each step gets its own directory (gantry.run.checkpoints.step_dir)"
            )
        json.dumps(extra)  # fail here, on the caller's side, if `extra` is not JSON-able
        self._finish_inflight()
        state = self._state_dict(model, optimizer, scheduler, step, extra)
        needed = self._check_room(path, state)
        if self.rank == 0:
            # A DONE left by an earlier, interrupted save into this directory would claim
            # files that this save is about to overwrite.
            (path / DONE).unlink(missing_ok=True)
        if self.async_mode:
            self._inflight = _InFlight(path, step, self._start_async_save(path, state), needed)
        else:
            writer = dcp.FileSystemWriter(path)
            try:
                dcp.save(state, storage_writer=writer, process_group=self._write_group)
            except (OSError, CheckpointException) as exc:
                if failed_for_room(path, needed, exc):
                    raise self._disk_full(path, needed) from exc
                raise
            self._mark_durable(path, step)
        self.last_save_blocking_s = time.perf_counter() - started

    def poll(self) -> list[Path]:
        """Saves that became durable on all ranks since the last poll/wait, oldest first;
        the same list on every rank. Never blocks on the writer (a collective, though)."""
        self._check_open()
        if self._inflight is not None:
            self._settle(block=False)
        return self._drain()

    def wait(self) -> list[Path]:
        """Like `poll`, but first blocks until the save in flight (if any) is durable."""
        self._check_open()
        self._finish_inflight()
        return self._drain()

    def load(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        allow_reshard: bool = False,
    ) -> tuple[int, dict]:
        """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns
        (step, extra). A collective. Raises CheckpointError for an unfinished checkpoint or,
        unless allow_reshard, one saved by a different number of ranks."""
        self._check_open()
        path = Path(path)
        self._finish_inflight()
        done = read_done(path)
        restore_rng = check_world_size(
            path, done["world_size"], self.world_size, allow_reshard=allow_reshard
        )
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
        # DCP loads tensors in place and replaces the BytesIO placeholders with the saved ones.
        state: dict[str, Any] = {MODEL: model_sd, OPTIMIZER: optim_sd, TRAINER: io.BytesIO()}
        if restore_rng:
            state[RNG] = {f"rank{self.rank}": io.BytesIO()}
        dcp.load(state, checkpoint_id=path, process_group=self._control_group)
        set_state_dict(
            model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIMIZER],
            options=_options(model),
        )  # fmt: skip
        trainer = _from_bytes(state[TRAINER])
        scheduler.load_state_dict(trainer["scheduler"])
        if restore_rng:
            set_rng_state(_from_bytes(state[RNG][f"rank{self.rank}"]))
        log.info("loaded policy checkpoint %s (step %d)", path, trainer["step"])
        return trainer["step"], trainer["extra"]

    def close(self) -> list[Path]:
        """Finish the save in flight and release the stager and process groups; returns what
        `wait` would. A collective; the checkpointer cannot be used afterwards."""
        if self._closed:
            return []
        finished = self.wait()
        if self._stager is not None:
            self._stager.close()
        dist.destroy_process_group(self._write_group)
        dist.destroy_process_group(self._control_group)
        self._closed = True
        return finished

    @property
    def in_flight(self) -> Path | None:
        """The path of the save being written in the background, if any (this rank's view)."""
        return self._inflight.path if self._inflight is not None else None

    # -- internals -------------------------------------------------------------------------

    def _state_dict(self, model, optimizer, scheduler, step: int, extra: dict) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
        trainer = {
            "step": step,
            "extra": extra,
            "scheduler": scheduler.state_dict(),
            "world_size": self.world_size,
        }
        return {
            MODEL: model_sd,
            OPTIMIZER: optim_sd,
            TRAINER: _to_bytes(trainer),  # the same on all ranks: DCP writes it once
            # One key per rank, so every rank's state is kept (DCP dedups equal keys). Inside
            # the DCP files rather than a side file: one writer, one completion, one marker.
            RNG: {f"rank{self.rank}": _to_bytes(rng_state())},
        }

    def _check_room(self, path: Path, state: dict) -> int:
        """Bytes the save needs, about: the newest complete checkpoint's files of this kind, or
        (the first save) the state's tensors on all ranks. A collective: when any rank's disk
        has less free, every rank raises DiskFullError before anything is written."""
        totals = torch.tensor([_tensor_bytes(state)], dtype=torch.int64)
        dist.all_reduce(totals, group=self._control_group)
        needed = int(totals[0])
        previous = run_files.latest_complete(path.parent.parent)  # path: .../step_N/policy
        if previous is not None:
            needed = max(needed, run_files.tree_bytes(previous / path.name))
        short = torch.tensor([int(needed > free_bytes(path))])
        dist.all_reduce(short, op=dist.ReduceOp.MAX, group=self._control_group)
        if short.item():
            raise self._disk_full(path, needed)
        return needed

    def _disk_full(self, path: Path, needed: int) -> DiskFullError:
        """The half-written save removed (its step directory too, once empty), so that the
        previous complete checkpoint is what is left; the one line for it."""
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        return disk_full_error(path, needed, "the policy checkpoint")

    def _start_async_save(self, path: Path, state: dict) -> Future:
        """Stage `state` (returns once it is copied) and write it in the background."""
        process = self.async_type == "process"
        writer = _BackgroundWriter(path, niceness=self.writer_niceness, in_writer_process=process)
        return dcp.async_save(
            state,
            storage_writer=writer,
            process_group=self._write_group,
            async_checkpointer_type=(
                AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD
            ),
            async_stager=self._stager,
        )

    def _finish_inflight(self) -> None:
        if self._inflight is not None:
            self._settle(block=True)

    def _settle(self, *, block: bool) -> bool:
        """Agree with the other ranks whether the save in flight is finished (all ranks must
        see it done: a rank that saw its own writer finish alone must not move on, or the ranks'
        collectives diverge); if so, mark it durable. Raises if it failed on any rank."""
        inflight = self._inflight
        assert inflight is not None
        if block:
            wait_futures([inflight.future])
        done = inflight.future.done()
        error = inflight.future.exception() if done else None
        full = failed_for_room(inflight.path, inflight.needed, error)
        flags = torch.tensor([int(not done), int(error is not None), int(full)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._control_group)
        pending, failed, full = bool(flags[0]), bool(flags[1]), bool(flags[2])
        if failed:
            self._inflight = None
            if full:  # on every rank: not retried (gantry.run.errors), whichever rank says it
                raise self._disk_full(inflight.path, inflight.needed) from error
            where = "this rank" if error is not None else "another rank"
            raise CheckpointError(
                f"saving the policy checkpoint {inflight.path} failed on {where}"
            ) from error
        if pending:
            return False
        self._inflight = None
        self._mark_durable(inflight.path, inflight.step)
        return True

    def _mark_durable(self, path: Path, step: int) -> None:
        """Called on all ranks once every rank's files and DCP's .metadata are on disk."""
        if self.rank == 0:
            marker = {
                "step": step,
                "world_size": self.world_size,
                "async": self.async_mode,
                "time": time.time(),
            }
            write_json_atomic(path / DONE, marker)
        # So that a path returned by poll/wait on any rank has its DONE marker on disk.
        dist.barrier(group=self._control_group)
        self._finished.append(path)
        log.info("policy checkpoint %s (step %d) is on disk", path, step)

    def _drain(self) -> list[Path]:
        finished, self._finished = self._finished, []
        return finished

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this PolicyCheckpointer was closed")
