"""Encoding an SFT rank's next step while the current one trains.

Each `SFTBatch` carries the following step's indices. While a rank trains step N, its encoder
processes (`train.train_policy.dataloader_num_workers`) render, tokenize, mask, load media and
collate its share of step N+1 into CPU micro-batches, so the training loop waits on neither the
chat template nor the image processor (bench/sft_throughput.py measured them at 7% of a text
step and ~20% of a VLM step). The processes are spawned, not forked: the training process holds
gloo / NCCL and tokenizer threads that a fork would copy mid-flight. They receive the samples
once, pickled; with 0 workers, or for a step nobody encoded ahead, the rank encodes inline,
with the same code, so both paths give the same micro-batches. Samples may be instances of the
dataset script's own classes (a torch Dataset returned by get_dataset): the script was imported
by path under a name no spawned process can import (`gantry_dataset_script`), so the workers
are told where such modules' files are and import them under the same name when unpickling
asks for them (`_ByPathFinder`).

    steps = StepEncoder(EncoderSpec(...), samples, workers=1)
    micro, truncated = steps.take(share)      # encoded ahead if `prepare(share)` was called
    steps.prepare(next_share)                 # starts encoding in the background
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from policy.sft_data import ConversationEncoder, MicroBatch, collate, with_fillers


@dataclass(frozen=True)
class EncoderSpec:
    """What turns a rank's share of a step into micro-batches (picklable)."""

    model_path: str
    max_length: int
    vision: bool
    mini_batch: int
    pad_token_id: int
    fillers: dict = field(default_factory=dict)  # blank media rows (policy.vision), if any


class ShareEncoder:
    """Encodes and collates shares of steps on CPU, in whichever process it lives."""

    def __init__(
        self, spec: EncoderSpec, samples: Sequence, encoder: ConversationEncoder | None = None
    ) -> None:
        self.spec, self.samples = spec, samples
        self.encoder = encoder or ConversationEncoder(
            spec.model_path, spec.max_length, vision=spec.vision
        )

    def micro_batches(self, chunks: list[list[int]]) -> tuple[list[MicroBatch], int]:
        """One CPU micro-batch per chunk of sample indices, and how many samples were cut at
        policy.model_max_length.

        The chunks' samples are regrouped by length (same chunk sizes): each micro-batch pads
        to its longest row, so rows of like length waste the least compute. The step's loss is
        a token sum over all its micro-batches, so the grouping does not change it."""
        examples = [self.encoder.encode(self.samples[i], i) for chunk in chunks for i in chunk]
        truncated = sum(e.truncated for e in examples)
        examples.sort(key=lambda e: len(e.input_ids))
        batches, start = [], 0
        for chunk in chunks:
            group = with_fillers(examples[start : start + len(chunk)], self.spec.fillers)
            batches.append(collate(group, self.spec.pad_token_id, torch.device("cpu")))
            start += len(chunk)
        return batches, truncated


_IN_WORKER: ShareEncoder | None = None
PARENT_POLL_S = 1.0


def _start_worker(
    spec: EncoderSpec, samples: bytes, parent: int, by_path: dict[str, str] | None = None
) -> None:
    global _IN_WORKER
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)  # the training process owns the compute threads
    if by_path:
        sys.meta_path.append(_ByPathFinder(by_path))  # last: what imports by name still wins
    _IN_WORKER = ShareEncoder(spec, pickle.loads(samples))


class _ByPathFinder(importlib.abc.MetaPathFinder):
    """Imports the parent's by-path modules (name -> file) under their name, on demand."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def find_spec(self, name, path=None, target=None):
        file = self.files.get(name)
        if file is None or path is not None:
            return None
        package = Path(file).name == "__init__.py"
        where = [str(Path(file).parent)] if package else None
        return importlib.util.spec_from_file_location(name, file, submodule_search_locations=where)


def by_path_modules() -> dict[str, str]:
    """This process's top-level modules that a spawned process cannot import by name (name ->
    file): those imported from a file whose name is not theirs (a dataset script) or from a
    directory not on sys.path."""
    roots = {os.path.abspath(entry or os.curdir) for entry in sys.path}
    found = {}
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if "." in name or name.startswith("__") or not origin or not origin.endswith(".py"):
            continue
        file = Path(origin)
        home, stem = (
            (file.parent.parent, file.parent.name)
            if file.stem == "__init__"
            else (file.parent, file.stem)
        )
        if stem != name or os.path.abspath(home) not in roots:
            found[name] = str(file)
    return found


def _exit_with_parent(parent: int) -> None:
    """A pool process holds both ends of its task pipe, so it never sees EOF when the training
    process is killed (SIGKILL, OOM): it watches for being re-parented instead."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _encode_in_worker(chunks: list[list[int]]) -> tuple[list[MicroBatch], int]:
    batches, truncated = _IN_WORKER.micro_batches(chunks)
    return [_as_arrays(b) for b in batches], truncated


def _as_arrays(batch: MicroBatch) -> MicroBatch:
    """Tensors as numpy arrays, pickled by value: torch would hand each one over through its
    own shared-memory file, ~0.1 ms apiece, more than a small batch takes to copy."""
    return _mapped(batch, lambda t: t.numpy())


def _as_tensors(batch: MicroBatch) -> MicroBatch:
    return _mapped(batch, torch.from_numpy)


def _mapped(batch: MicroBatch, fn) -> MicroBatch:
    return replace(
        batch,
        input_ids=fn(batch.input_ids),
        attention_mask=fn(batch.attention_mask),
        targets=fn(batch.targets),
        label_positions=fn(batch.label_positions),
        vision={k: fn(v) for k, v in batch.vision.items()},
    )


class StepEncoder:
    """A rank's micro-batches of a step: taken from the workers when they encoded that share
    ahead (`prepare`), else encoded inline."""

    def __init__(self, spec: EncoderSpec, samples: Sequence, workers: int) -> None:
        self.spec, self.workers = spec, workers
        self.inline = ShareEncoder(spec, samples)
        self.pool: ProcessPoolExecutor | None = None
        self.ahead: tuple[tuple[int, ...], list[Future]] | None = None
        if workers > 0:
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(spec, _pickled(samples), os.getpid(), by_path_modules()),
            )
            self.pool.submit(int)  # start the processes now, while the model loads

    def parts(self, share: Sequence[int]) -> list[list[list[int]]]:
        """`share` in chunks of `mini_batch` indices, the chunks split in one part per worker
        (one part without workers). Each part is encoded and grouped by length as a whole,
        inline or in a worker alike, so both paths give the same micro-batches."""
        size = self.spec.mini_batch
        chunks = [list(share[i : i + size]) for i in range(0, len(share), size)]
        per_part = -(-len(chunks) // max(self.workers, 1))
        return [chunks[i : i + per_part] for i in range(0, len(chunks), per_part)]

    def prepare(self, share: Sequence[int]) -> None:
        """Start encoding `share` in the workers (no-op without workers)."""
        if self.pool is None or not share:
            return
        futures = [self.pool.submit(_encode_in_worker, part) for part in self.parts(share)]
        self.ahead = (tuple(share), futures)

    def encode_inline(self, share: Sequence[int]) -> tuple[list[MicroBatch], int]:
        batches, truncated = [], 0
        for part in self.parts(share):
            part_batches, cut = self.inline.micro_batches(part)
            batches += part_batches
            truncated += cut
        return batches, truncated

    def take(self, share: Sequence[int]) -> tuple[list[MicroBatch], int]:
        """The micro-batches of `share` (CPU tensors) and the count of truncated samples."""
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead[0] != tuple(share):
            return self.encode_inline(share)
        batches, truncated = [], 0
        for future in ahead[1]:
            part, cut = future.result()  # a sample's error is raised here, as inline
            batches += [_as_tensors(b) for b in part]
            truncated += cut
        return batches, truncated

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def _pickled(samples: Sequence) -> bytes:
    try:
        return pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL)
    # What pickling an unpicklable object raises: PicklingError (a class it cannot find),
    # TypeError (a lock, a generator), AttributeError (a local function or class).
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"the dataset's samples ({type(samples).__name__}) cannot be pickled for the encoder "
            f"processes ({type(exc).__name__}: {exc}); return plain dicts / lists or a datasets "
            "Dataset from get_dataset, or set train.train_policy.dataloader_num_workers = 0"
        ) from exc
