"""Export of the policy as a Hugging Face directory: sharded safetensors, index, config, tokenizer
(and, for VLMs, the processor files of the source checkpoint).

    path = export_hf(model, source_dir, out_dir)   # on every rank of the policy job

No tensor data crosses the process group. The whole layout (the shard file of each tensor, the
safetensors headers, every byte offset) is planned up front from shapes and dtypes, which
sharded (DTensor) entries know without a gather, so every rank can write its part itself:

1. rank 0 makes `<out>.tmp` and every shard file in it at its full size, header written;
2. every rank writes its own rows of each FSDP2 parameter (sharded on dim 0: a rank's rows are
   one consecutive byte range of the tensor) at their offsets with `os.pwrite`, starting at a
   different file than the other ranks; with HSDP the replicas take turns, one per tensor.
   Entries that are not DTensors are written by rank 0, and a DTensor sharded any other way
   is all-gathered and written by rank 0, which also writes the index, config and tokenizer;
3. once every rank has reported success, rank 0 renames `<out>.tmp` to `<out>`.

This needs every rank to see `out_dir` on one shared filesystem (true on one node; on a cluster
exports and checkpoints already assume it). Rank 0 checks it with a marker file before step 2;
if some rank does not see the marker, every DTensor is all-gathered to rank 0 instead (correct,
much slower). No rank holds more than its own shards, plus one gathered tensor when gathering.

With an FSDP2-sharded model `export_hf` is a collective: every rank calls it, rank 0 gets the
path, the others None; a failure on any rank is raised on every rank. A plain model in a single
process (no process group) works the same way. Since the directory is renamed only when complete,
a failed export never leaves a half export under the final name, nor touches a previous one. It
loads with `AutoModelForCausalLM.from_pretrained` and vLLM.

This module owns the collective steps and the metadata files; the safetensors layout and the
writes in place are `policy.export_files`'s.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from huggingface_hub import try_to_load_from_cache
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoTokenizer, PreTrainedModel

from gantry.comm.torch_compat import compute_local_shape_and_global_offset
from policy.export_files import (
    INDEX_NAME,
    SHARD_NAME,
    HeldBytes,
    Piece,
    ShardFiles,
    TensorSpec,
    parse_size,
    plan_shards,
)
from policy.lora import export_adapter, is_lora, merged_state

# Re-exported: the layout's names are part of the export's API (tests, bench/export.py).
__all__ = [
    "INDEX_NAME",
    "SHARD_NAME",
    "ExportStats",
    "ShardFiles",
    "TensorSpec",
    "export_hf",
    "in_rows",
    "own_pieces",
    "parse_size",
    "plan_shards",
    "specs_of",
    "state_entries",
    "tied_weight_names",
]

log = logging.getLogger("gantry.policy")
T = TypeVar("T")

# Files a VLM's processor loads from; copied as files (AutoProcessor would need torchvision).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


@dataclass
class ExportStats:
    """Figures of one export, filled on rank 0 (for logs, tests and benchmarks)."""

    path: Path | None = None
    tensors: int = 0
    shards: int = 0
    total_bytes: int = 0
    largest_tensor_bytes: int = 0
    # Most bytes of tensors the export itself allocated on rank 0 alive at once (gathered
    # tensors, host copies of device shards): 0 when every rank writes its shards in place.
    peak_held_bytes: int = 0
    seconds: float = 0.0


def export_hf(
    model: PreTrainedModel,
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    stats: ExportStats | None = None,
    lora_adapter: bool = False,
) -> Path | None:
    """Write `model`'s weights (in the parameters' dtype), config and generation config, and the
    tokenizer and processor files of `source_dir`, to `out_dir`.

    A collective when the process group has more than one rank: every rank must call it. Returns
    the export's path on rank 0 and None on the others. `max_shard_size` bounds each safetensors
    file (bytes, or a string such as "2GB"); a tensor larger than that gets a file of its own.
    A LoRA model (policy.lora) is exported merged, under the base model's names, or with
    `lora_adapter` as its adapter alone (train.ckpt.export_lora_adapter).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if lora_adapter and is_lora(model):
        return export_adapter(model, source_dir, out_dir)
    tied = tied_weight_names(model)
    entries = merged_state(model, tied) if is_lora(model) else state_entries(model, tied)
    shards = plan_shards(specs_of(entries), parse_size(max_shard_size))
    files = ShardFiles(out_dir.with_name(out_dir.name + ".tmp"), shards)
    held = HeldBytes()
    pieces = _pieces_to_write(entries, files, out_dir)
    written, error = _write_part(model, entries, pieces, files, source_dir, held)
    _raise_if_failed(files, written, error, out_dir)
    _on_rank0(lambda: files.publish(out_dir), out_dir)
    if _rank() != 0:
        return None
    stats = stats if stats is not None else ExportStats()
    stats.path, stats.tensors, stats.shards = out_dir, len(entries), len(shards)
    stats.total_bytes = files.total_bytes
    stats.largest_tensor_bytes = max((s.nbytes for s in files.specs()), default=0)
    stats.peak_held_bytes = held.peak
    stats.seconds = time.perf_counter() - started
    log.info(
        "exported %s: %d tensors, %d shards, %.1f MB in %.2fs (peak %.1f MB held)",
        out_dir, stats.tensors, stats.shards, stats.total_bytes / 1e6, stats.seconds,
        stats.peak_held_bytes / 1e6,
    )  # fmt: skip
    return out_dir


def tied_weight_names(model: PreTrainedModel) -> frozenset[str]:
    """State-dict names that are copies of another weight (a tied LM head): not exported (and
    not even gathered); transformers re-ties them on load, and safetensors refuses shared memory."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: {copy: source}
    if tied is not None:
        return frozenset(tied)
    config = model.config
    text_config = getattr(config, "text_config", None)
    ties = getattr(config, "tie_word_embeddings", False) or (
        text_config is not None and getattr(text_config, "tie_word_embeddings", False)
    )
    return frozenset({"lm_head.weight"}) if ties else frozenset()


def state_entries(
    model: torch.nn.Module, skip: frozenset[str] = frozenset()
) -> list[tuple[str, torch.Tensor]]:
    """(name, value) of each state-dict entry to export, in state-dict order (DTensors as such)."""
    return [(name, value) for name, value in model.state_dict().items() if name not in skip]


def specs_of(entries: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """Name, global shape and dtype of each entry; a DTensor reports its shape without a gather."""
    return [TensorSpec(name, tuple(value.shape), value.dtype) for name, value in entries]


# --- the steps of a collective export ---------------------------------------------------
# Between two collectives nothing may raise on one rank only (the others would wait for it
# until the process group's timeout): failures are caught and reported in the next collective.


def _pieces_to_write(
    entries: list[tuple[str, torch.Tensor]], files: ShardFiles, out_dir: Path
) -> dict[int, list[Piece]]:
    """Step 1: rank 0 creates the files; then, by entry index, the pieces this rank writes in
    place. Entries left out are all-gathered: DTensors not in rows (`in_rows`), and every
    DTensor unless all ranks see rank 0's files and hold the shards DTensor's layout says."""
    export_id = _on_rank0(files.create, out_dir)
    rank = _rank()
    pieces = {
        i: own_pieces(i, value, rank)
        for i, (_, value) in enumerate(entries)
        if not isinstance(value, DTensor) or in_rows(value)
    }
    sees = rank == 0 or files.sees(export_id)
    fits = all(p is not None for p in pieces.values())
    sees, fits = _combine([int(sees), int(fits)], "min")
    if sees and fits:
        return pieces
    if rank == 0:
        why = (
            "some rank's shards are not where DTensor's layout says"
            if sees
            else f"some rank does not see {files.out_dir} (give out_dir on a filesystem all share)"
        )
        log.warning("export: %s; all-gathering every sharded tensor to rank 0 instead", why)
    return {i: p for i, p in pieces.items() if not isinstance(entries[i][1], DTensor)}


def in_rows(value: DTensor) -> bool:
    """Whether each rank's part of `value` is one run of whole rows, consecutive bytes of the
    full tensor: sharded on dim 0 only (FSDP2's Shard(0)), replicated otherwise (HSDP)."""
    return all((type(p) is Shard and p.dim == 0) or p.is_replicate() for p in value.placements)


def own_pieces(index: int, value: torch.Tensor, rank: int) -> list[Piece] | None:
    """What this rank writes of entry `index`: all of a plain tensor on rank 0; of a DTensor in
    rows, its local rows if its replica is the one writing this entry (replicas take turns).
    None if the local shard is not the one DTensor's layout puts on this rank."""
    if not isinstance(value, DTensor):
        return [(0, value.detach())] if rank == 0 else []
    mesh, placements = value.device_mesh, value.placements
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # not in this tensor's mesh
        return []
    replica, replicas = 0, 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            replica = replica * mesh.size(dim) + coordinate[dim]
            replicas *= mesh.size(dim)
    shape, offset = compute_local_shape_and_global_offset(value.shape, mesh, placements)
    local = value.to_local().detach()
    if tuple(local.shape) != tuple(shape):
        return None
    if replica != index % replicas or local.numel() == 0:
        return []
    row_bytes = math.prod(value.shape[1:]) * value.dtype.itemsize
    return [(offset[0] * row_bytes if offset else 0, local)]


def _write_part(
    model: PreTrainedModel,
    entries: list[tuple[str, torch.Tensor]],
    pieces: dict[int, list[Piece]],
    files: ShardFiles,
    source_dir: str | Path,
    held: HeldBytes,
) -> tuple[int, Exception | None]:
    """Step 2: write this rank's pieces, then take part in the all-gathers of the other entries
    (in state-dict order on every rank); rank 0 also writes the index and metadata. Returns
    (tensor bytes written, the error if any): after a failure this rank writes nothing more but
    still joins the all-gathers, so that no rank hangs."""
    rank = _rank()
    gathers = [i for i in range(len(entries)) if i not in pieces]
    progress = _Progress()

    def write_all() -> None:
        for i in files.write_order(pieces, rank, _world()):
            progress.written += sum(
                files.write(entries[i][0], p, offset, held) for offset, p in pieces[i]
            )
        for i in gathers:
            mine = _gathered(entries[i][1], rank, held)
            progress.gathered += 1
            progress.written += sum(
                files.write(entries[i][0], p, offset, held) for offset, p in mine
            )
            del mine
        if rank == 0:
            files.write_index()
            _write_metadata(model, files.shards, source_dir, files.out_dir)
        files.close()

    _, error = _attempt(write_all)  # raised on every rank once all know (`_raise_if_failed`)
    if error is not None:
        files.abandon()
        for i in gathers[progress.gathered :]:
            _gathered(entries[i][1], rank, HeldBytes())
    return progress.written, error


@dataclass
class _Progress:
    written: int = 0  # tensor bytes this rank wrote
    gathered: int = 0  # all-gathers this rank took part in


def _attempt(action: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """(`action()`, None), or (None, the error it raised). For the steps between two
    collectives of an export: the error is raised on every rank after the next collective."""
    try:
        return action(), None
    except Exception as err:  # broad on purpose: whatever failed on this rank (I/O, a dtype,
        # a bug), the other ranks must hear of it in the next collective, not wait for this
        # rank until the process group's timeout; it is raised again then, unchanged.
        return None, err


def _gathered(value: DTensor, rank: int, held: HeldBytes) -> list[Piece]:
    """All-gather `value` (a collective): rank 0 writes all of it, the others nothing."""
    full = value.full_tensor()
    if rank != 0:
        return []
    held.track(full)
    return [(0, full)]


def _raise_if_failed(
    files: ShardFiles, written: int, error: Exception | None, out_dir: Path
) -> None:
    """Step 3's check, a collective: whether every rank wrote its part. If not, rank 0 removes
    `<out>.tmp` and every rank raises (its own error, or one naming the ranks that failed)."""
    rank, world = _rank(), _world()
    failed = [int(error is not None and r == rank) for r in range(world)]
    total, *failed = _combine([written, *failed], "sum")
    if not any(failed) and total == files.total_bytes:
        return
    if rank == 0:
        shutil.rmtree(files.out_dir, ignore_errors=True)  # a failed export's debris, if it can
    if error is not None:
        raise error
    if any(failed):
        ranks = [r for r, f in enumerate(failed) if f]
        raise RuntimeError(f"export to {out_dir} failed on rank(s) {ranks}; see their errors")
    raise RuntimeError(f"export to {out_dir}: {total} of {files.total_bytes} bytes were written")


def _on_rank0(action: Callable[[], int], out_dir: Path) -> int:
    """Rank 0 runs `action` (returning a non-zero int) and every rank gets its result; a
    failure on rank 0 is raised on every rank."""
    result, error = 0, None
    if _rank() == 0:
        result, error = _attempt(action)  # raised below, once the other ranks know
    (result,) = _combine([result or 0], "broadcast")
    if error is not None:
        raise error
    if result == 0:
        raise RuntimeError(f"export to {out_dir} failed on rank 0; see rank 0's error")
    return result


def _combine(values: list[int], op: str) -> list[int]:
    """`values` broadcast from rank 0 ("broadcast") or reduced over every rank ("sum", "min");
    unchanged without a process group."""
    if _world() == 1:
        return values
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    if op == "broadcast":
        dist.broadcast(tensor, src=0)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return tensor.tolist()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _write_metadata(
    model: PreTrainedModel, shards: list[list[TensorSpec]], source_dir: str | Path, out: Path
) -> None:
    """config.json (its dtype that of the exported weights), generation config, tokenizer, and
    the processor files the source checkpoint has."""
    config = copy.deepcopy(model.config)
    dtype = _weights_dtype(spec for shard in shards for spec in shard)
    if dtype is not None:
        sub_configs = (getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
        for cfg in (config, *sub_configs):
            if cfg is not None:
                cfg.dtype = dtype
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out)
    for name in PROCESSOR_FILES:
        source = _source_file(source_dir, name)
        if source is not None:
            shutil.copyfile(source, out / name)


def _weights_dtype(specs: Iterable[TensorSpec]) -> torch.dtype | None:
    """The floating dtype holding the most bytes: what the config should declare."""
    by_dtype: dict[torch.dtype, int] = {}
    for spec in specs:
        if spec.dtype.is_floating_point:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None


def _source_file(source_dir: str | Path, name: str) -> Path | None:
    """`name` in the source checkpoint: a local directory, or a hub id's files already in the
    local cache (no download: the export must not wait on the network)."""
    local = Path(source_dir)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    cached = try_to_load_from_cache(str(source_dir), name)
    return Path(cached) if isinstance(cached, str) else None
