"""Export of the policy as a Hugging Face directory: sharded safetensors, index, config, tokenizer
(and, for VLMs, the processor files of the source checkpoint).

The export streams. The whole layout (the shard file of each tensor, the safetensors headers,
every byte offset) is planned up front from shapes and dtypes, which sharded (DTensor) entries
know without a gather; then the state dict is moved to rank 0 one tensor at a time and rank 0
writes each piece straight to its place in its shard file. With FSDP2 on the CPU the other ranks
send their shards point to point (rank 0 writes its own shard while theirs arrive); other
layouts are all-gathered. Rank 0 never holds more than one tensor's worth of received data
beyond its own shards, and the other ranks nothing beyond theirs.

    path = export_hf(model, source_dir, out_dir)   # on every rank of the policy job

With an FSDP2-sharded model `export_hf` is a collective: every rank calls it, rank 0 writes and
gets the path, the others get None; a failure on rank 0 is raised on every rank. A plain model in
a single process (no process group) works the same way. The directory is written as `<out>.tmp`
and renamed when complete, so a crash never leaves a half export under the final name. It loads
with `AutoModelForCausalLM.from_pretrained` and vLLM.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import struct
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import try_to_load_from_cache
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, PreTrainedModel

log = logging.getLogger("gantry.policy")

INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
# Files a VLM's processor loads from; copied as files (AutoProcessor would need torchvision).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What the layout needs to know about a tensor: known without gathering a DTensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass
class ExportStats:
    """Figures of one export, filled on rank 0 (for logs, tests and benchmarks)."""

    path: Path | None = None
    tensors: int = 0
    shards: int = 0
    total_bytes: int = 0
    largest_tensor_bytes: int = 0
    peak_held_bytes: int = 0  # most bytes of received or gathered tensors alive at once
    seconds: float = 0.0


def export_hf(
    model: PreTrainedModel,
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    stats: ExportStats | None = None,
) -> Path | None:
    """Write `model`'s weights (in the parameters' dtype), config and generation config, and the
    tokenizer and processor files of `source_dir`, to `out_dir`.

    A collective when the process group has more than one rank: every rank must call it. Returns
    the export's path on rank 0 and None on the others. `max_shard_size` bounds each safetensors
    file (bytes, or a string such as "2GB"); a tensor larger than that gets a file of its own.
    """
    started = time.perf_counter()
    rank = dist.get_rank() if dist.is_initialized() else 0
    skip = tied_weight_names(model)
    if rank != 0:
        send_shards(model, skip)
        if not _rank0_succeeded(True):
            raise RuntimeError(f"export to {out_dir} failed on rank 0; see rank 0's error")
        return None
    stats = stats if stats is not None else ExportStats()
    held = HeldBytes()
    tensors = tensors_on_rank0(model, skip, held)
    try:
        specs = state_specs(model, skip)
        shards = plan_shards(specs, parse_size(max_shard_size))
        path = _write_export(model, tensors, shards, source_dir, Path(out_dir), stats)
    except Exception:
        # The other ranks are still sending: receive the rest so nobody hangs, then tell them.
        for _ in tensors:
            pass
        _rank0_succeeded(False)
        raise
    _rank0_succeeded(True)
    stats.peak_held_bytes = held.peak
    stats.seconds = time.perf_counter() - started
    log.info(
        "exported %s: %d tensors, %d shards, %.1f MB in %.2fs (peak %.1f MB held)",
        path, stats.tensors, stats.shards, stats.total_bytes / 1e6, stats.seconds,
        stats.peak_held_bytes / 1e6,
    )  # fmt: skip
    return path


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


def state_specs(model: torch.nn.Module, skip: frozenset[str] = frozenset()) -> list[TensorSpec]:
    """Name, global shape and dtype of each state-dict entry, in state-dict order; a DTensor
    reports its global shape without a gather."""
    return [
        TensorSpec(name, tuple(value.shape), value.dtype)
        for name, value in model.state_dict().items()
        if name not in skip
    ]


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of tensors, each at most `max_shard_bytes` (a larger tensor alone).

    Unlike huggingface_hub's splitter, a shard is always a consecutive run, so shards complete
    one after the other as the tensors stream in.
    """
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like transformers' max_shard_size: "2GB" (10^9), "500MiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)\s*", size, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"max_shard_size {size!r}: give bytes or a size such as '2GB' or '500MiB'")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


# --- moving the tensors to rank 0 ----------------------------------------------------------
# gloo's all-gather moves ~0.2-0.4 GB/s on the project's machines, its send/recv ~1.5 GB/s, and
# only rank 0 needs the tensors: FSDP2 shards on the CPU are sent point to point. Anything else
# (other placements, GPU tensors, where NCCL's all-gather is fast) is all-gathered.
Pieces = Iterator[tuple[int, torch.Tensor]]  # (byte offset in the full tensor, CPU tensor)
Receives = list[tuple[int, "dist.Work", torch.Tensor]]  # (byte offset, pending recv, buffer)


def tensors_on_rank0(
    model: torch.nn.Module, skip: frozenset[str], held: HeldBytes
) -> Iterator[tuple[str, Pieces]]:
    """Rank 0's side: (name, pieces covering the full tensor) for each state-dict entry, in
    state-dict order. The other ranks must run `send_shards` at the same time.

    Receives run one tensor ahead: while rank 0 writes tensor i, the peers' shards of tensor
    i+1 are already coming, as long as both fit in one tensor's worth of memory (the largest).
    """
    entries = shard_rows(model, skip)
    rows = [row for _, _, row in entries]
    budget = max((v.numel() * v.element_size() for _, v, _ in entries), default=0)
    posted: dict[int, Receives] = {}

    def post(i: int, *, ahead: bool) -> None:
        if i >= len(entries) or rows[i] is None or i in posted:
            return
        value = entries[i][1]
        incoming = value.numel() * value.element_size() * (len(rows[i]) - 1) // len(rows[i])
        if not ahead or held.now + incoming <= budget:
            posted[i] = _post_receives(value, rows[i], held)

    for i, (name, value, row) in enumerate(entries):
        if row is None:
            pieces = _gathered(value, held)
        else:
            post(i, ahead=False)
            pieces = _received(value, posted.pop(i), lambda i=i: post(i + 1, ahead=True))
        yield name, pieces
        for _ in pieces:  # what a failed consumer left: the peers send it all the same
            pass


def send_shards(model: torch.nn.Module, skip: frozenset[str]) -> None:
    """The other ranks' side of `tensors_on_rank0`: send (or all-gather) each shard."""
    rank = dist.get_rank()
    for _, value, row in shard_rows(model, skip):
        if row is None:
            if isinstance(value, DTensor):
                value.full_tensor()  # the all-gather rank 0 takes part in
            continue
        shapes = _chunk_shapes(value, len(row))
        position = row.index(rank) if rank in row else len(shapes)  # another replica: idle
        if position < len(shapes) and shapes[position].numel() > 0:
            dist.send(value.to_local().detach().contiguous(), dst=0)


def shard_rows(
    model: torch.nn.Module, skip: frozenset[str]
) -> list[tuple[str, torch.Tensor, list[int] | None]]:
    """(name, value, ranks that send rank 0 its dim-0 shards, or None to all-gather it) for
    each entry to export. A collective when any entry is sent point to point: every rank checks
    that its shards are where torch.chunk puts them (what rank 0 plans with), and unless all
    agree, everything is all-gathered instead, so a layout surprise costs speed, not data."""
    entries = [
        (name, value, _dim0_shard_row(value))
        for name, value in model.state_dict().items()
        if name not in skip
    ]
    if all(row is None for _, _, row in entries):  # the same on every rank: no collective
        return entries
    rank = dist.get_rank()
    ok = all(row is None or _chunk_of(value, row, rank) for _, value, row in entries)
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item():
        return entries
    log.warning("export: FSDP2 shards are not torch.chunk's split; all-gathering instead")
    return [(name, value, None) for name, value, _ in entries]


def _chunk_of(value: DTensor, row: list[int], rank: int) -> bool:
    """Whether this rank's shard has the shape torch.chunk gives its place in the row."""
    if rank not in row:
        return True
    shapes = _chunk_shapes(value, len(row))
    position = row.index(rank)
    expected = shapes[position] if position < len(shapes) else (0, *value.shape[1:])
    return tuple(value.to_local().shape) == tuple(expected)


def _gathered(value: torch.Tensor, held: HeldBytes) -> Pieces:
    full = value.full_tensor() if isinstance(value, DTensor) else value.detach()
    held.track(full)
    yield 0, full


def _received(value: DTensor, receives: Receives, post_next: Callable[[], None]) -> Pieces:
    """Rank 0's own shard first, written while the peers' arrive; then theirs."""
    yield 0, value.to_local().detach()
    post_next()
    for offset, work, buffer in receives:
        work.wait()
        yield offset, buffer


def _post_receives(value: DTensor, row: list[int], held: HeldBytes) -> Receives:
    """Start receiving the peers' shards of `value`, each into its own buffer."""
    shapes = _chunk_shapes(value, len(row))
    local = value.to_local()  # its shape checked by shard_rows
    receives, offset = [], local.numel() * local.element_size()
    for peer, shape in zip(row[1:], shapes[1:], strict=False):
        if shape.numel() > 0:
            buffer = torch.empty(shape, dtype=value.dtype)
            held.track(buffer)
            receives.append((offset, dist.irecv(buffer, src=peer), buffer))
            offset += buffer.numel() * buffer.element_size()
    return receives


def _dim0_shard_row(value: torch.Tensor) -> list[int] | None:
    """Global ranks holding the shards of rank 0's replica, for a CPU DTensor (under gloo)
    sharded on dim 0 along one mesh dim (FSDP2) and replicated along the others (HSDP); None
    otherwise. Dim-0 shards are consecutive byte ranges of the full tensor: written as they are."""
    if not isinstance(value, DTensor) or value.device.type != "cpu":
        return None
    if "gloo" not in dist.get_backend():  # CPU-offloaded shards under NCCL: NCCL has no CPU p2p
        return None
    placements = value.placements
    sharded = [i for i, p in enumerate(placements) if p.is_shard()]
    if len(sharded) != 1 or not all(p.is_shard() or p.is_replicate() for p in placements):
        return None
    if placements[sharded[0]].dim != 0:
        return None
    ranks = value.device_mesh.mesh
    if ranks.flatten()[0].item() != 0:  # rank 0 must hold the first shard of its replica
        return None
    index = [0] * ranks.ndim
    index[sharded[0]] = slice(None)
    return ranks[tuple(index)].tolist()


def _chunk_shapes(value: torch.Tensor, parts: int) -> list[torch.Size]:
    """The shards' shapes: torch.chunk's split on dim 0, as FSDP2 and DTensor's Shard(0) make
    them (the last ones may be smaller, or missing when dim 0 has fewer rows than ranks)."""
    return [c.shape for c in torch.empty(value.shape, device="meta").chunk(parts, 0)]


def _write_export(
    model: PreTrainedModel,
    tensors: Iterator[tuple[str, Pieces]],
    shards: list[list[TensorSpec]],
    source_dir: str | Path,
    out_dir: Path,
    stats: ExportStats,
) -> Path:
    """Rank 0's part: stream the tensors into `<out>.tmp`, add the metadata, rename."""
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    writer = StreamingShardWriter(tmp_dir, shards)
    for name, pieces in tensors:
        writer.write_pieces(name, pieces)
    writer.close()
    _write_metadata(model, shards, source_dir, tmp_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    stats.path = out_dir
    stats.tensors = sum(len(shard) for shard in shards)
    stats.shards = len(shards)
    stats.total_bytes = writer.total_bytes
    stats.largest_tensor_bytes = max((s.nbytes for shard in shards for s in shard), default=0)
    return out_dir


def _rank0_succeeded(ok: bool) -> bool:
    """Rank 0 tells every rank whether it wrote the export (a no-op without other ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class HeldBytes:
    """Bytes of received or gathered tensors alive at once on rank 0, counted from allocation
    to release with finalizers: what the export really holds, leaks included."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.now -= nbytes


class StreamingShardWriter:
    """Writes planned safetensors shards tensor by tensor, each straight to its byte offset.

    Each shard's header (names, dtypes, shapes, offsets) is written when its first tensor
    arrives; the file is closed when its last one has. The data layout orders tensors by
    decreasing element size, as safetensors' own writer does, so every tensor is aligned.
    """

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]]) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this host is not")
        self.out_dir, self.shards = out_dir, shards
        self.filenames = [
            SHARD_NAME.format(index=i + 1, total=len(shards)) for i in range(len(shards))
        ]
        self.where = {spec.name: (i, spec) for i, shard in enumerate(shards) for spec in shard}
        self.remaining = [len(shard) for shard in shards]
        self.open_files: dict[int, tuple] = {}  # shard -> (file, data start, offsets)
        self.total_bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor."""
        spec = self.where[name][1] if name in self.where else None
        if spec is not None and tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"export: {name} is {tuple(tensor.shape)}, planned as {spec.shape}")
        self.write_pieces(name, [(0, tensor)])

    def write_pieces(self, name: str, pieces: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Write one tensor given as (byte offset, piece) parts that together cover it."""
        if name not in self.where:
            raise RuntimeError(f"export: got tensor {name!r}, which is not in the planned layout")
        index, spec = self.where.pop(name)
        if index not in self.open_files:
            self.open_files[index] = self._open(index)
        file, data_start, offsets = self.open_files[index]
        written = 0
        for offset, piece in pieces:
            nbytes = piece.numel() * piece.element_size()
            if piece.dtype != spec.dtype or offset + nbytes > spec.nbytes:
                raise RuntimeError(
                    f"export: {name}: a {piece.dtype} piece of {nbytes} bytes at {offset} does "
                    f"not fit the planned {spec.dtype} tensor of {spec.nbytes} bytes"
                )
            file.seek(data_start + offsets[name] + offset)
            file.write(_raw_bytes(piece))
            written += nbytes
        if written != spec.nbytes:
            raise RuntimeError(f"export: {name}: {written} of its {spec.nbytes} bytes came")
        self.total_bytes += written
        self.remaining[index] -= 1
        if self.remaining[index] == 0:
            self.open_files.pop(index)[0].close()

    def _open(self, index: int) -> tuple:
        header, offsets, data_bytes = safetensors_header(self.shards[index])
        file = (self.out_dir / self.filenames[index]).open("wb")
        file.write(header)
        file.truncate(len(header) + data_bytes)  # the exact size safetensors checks on load
        return file, len(header), offsets

    def close(self) -> None:
        """Check every planned tensor was written, then write the index."""
        for file, _, _ in self.open_files.values():
            file.close()
        if self.where:
            missing = sorted(self.where)[:5]
            raise RuntimeError(f"export: {len(self.where)} planned tensors never came: {missing}")
        weight_map = {
            spec.name: self.filenames[i] for i, shard in enumerate(self.shards) for spec in shard
        }
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def safetensors_header(shard: list[TensorSpec]) -> tuple[bytes, dict[str, int], int]:
    """(8-byte length + JSON header padded to 8 bytes, offset of each tensor in the data
    section, size of the data section) for one shard file."""
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for spec in sorted(shard, key=lambda s: -s.dtype.itemsize):  # stable: keeps state order
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"export: {spec.name} has dtype {spec.dtype}, which is not exported")
        end = position + spec.nbytes
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [position, end],
        }
        offsets[spec.name] = position
        position = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header, offsets, position


def _raw_bytes(tensor: torch.Tensor):
    """The tensor's bytes without a copy where it is already contiguous on the CPU (a uint8
    view: numpy has no bfloat16)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


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
