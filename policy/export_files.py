"""The safetensors files of an export: their layout, planned from shapes and dtypes alone, and
writes of any piece of any tensor straight to its place, from any rank.

`plan_shards` groups tensors into files of at most `max_shard_size`; `ShardFiles` computes
each file's header and each tensor's byte range, creates the files at their full size, and
writes pieces at their offsets with `os.pwrite`. `policy.export` drives it collectively.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from gantry.run.errors import NonFiniteError, disk_full_error, free_bytes, is_disk_full

INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
MARKER_NAME = ".export-id"  # in <out>.tmp while the ranks write: proves they share its filesystem
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


Piece = tuple[int, torch.Tensor]  # (byte offset in the full tensor, the part written there)


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of tensors, each at most `max_shard_bytes` (a larger tensor alone)."""
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


class HeldBytes:
    """Bytes of tensors the export allocated (gathered tensors, host copies) alive at once,
    counted from allocation to release with finalizers: what it really holds, leaks included."""

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


class ShardFiles:
    """The planned safetensors files of an export, in `out_dir`: each tensor's place, and writes
    of any piece of a tensor straight to its place with `os.pwrite`, from any rank (each opens
    the files itself). The data section orders tensors by decreasing element size, as
    safetensors' own writer does, so every tensor is aligned."""

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]]) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this host is not")
        self.out_dir, self.shards = out_dir, shards
        self.filenames = [
            SHARD_NAME.format(index=i + 1, total=len(shards)) for i in range(len(shards))
        ]
        self.headers: list[tuple[bytes, int]] = []  # (header, file size)
        self.places: dict[str, tuple[int, int, TensorSpec]] = {}  # name: (file, start, spec)
        for i, shard in enumerate(shards):
            header, offsets, data_bytes = safetensors_header(shard)
            self.headers.append((header, len(header) + data_bytes))
            for spec in shard:
                self.places[spec.name] = (i, len(header) + offsets[spec.name], spec)
        self.total_bytes = sum(spec.nbytes for spec in self.specs())
        self.fds: dict[int, int] = {}  # file: descriptor, opened at its first write

    def specs(self) -> Iterable[TensorSpec]:
        return (spec for shard in self.shards for spec in shard)

    def write_order(self, pieces: dict[int, list[Piece]], rank: int, world: int) -> list[int]:
        """The entries (numbered in planned order) that `pieces` has, in order but starting at
        the file `rank` / `world` of the way in: a filesystem takes a file's lock for each
        buffered write, so ranks that write different files at a time write in parallel."""
        files = [i for i, shard in enumerate(self.shards) for _ in shard]
        first = rank * len(self.shards) // world
        return sorted(pieces, key=lambda i: ((files[i] - first) % len(self.shards), i))

    def create(self) -> int:
        """Rank 0: make `out_dir` anew with every file at its exact size (what safetensors
        checks on load), headers written, and a marker with a new export id, returned."""
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        # The files are made sparse at their size: a full disk shows only once written into.
        needed = sum(size for _, size in self.headers)
        if needed > free_bytes(self.out_dir):
            raise disk_full_error(self.out_dir, needed, "the export")
        self.out_dir.mkdir(parents=True)
        for filename, (header, size) in zip(self.filenames, self.headers, strict=True):
            with (self.out_dir / filename).open("wb") as file:
                file.write(header)
                file.truncate(size)
        export_id = int.from_bytes(os.urandom(7), "little") + 1
        (self.out_dir / MARKER_NAME).write_text(str(export_id))
        return export_id

    def sees(self, export_id: int) -> bool:
        """Whether this rank sees the files rank 0 created (they share a filesystem)."""
        try:
            return (self.out_dir / MARKER_NAME).read_text() == str(export_id)
        except OSError:
            return False

    def write(
        self, name: str, piece: torch.Tensor, offset: int = 0, held: HeldBytes | None = None
    ) -> int:
        """Write `piece` (on any device) at byte `offset` of tensor `name`; returns its bytes."""
        if name not in self.places:
            raise RuntimeError(f"export: got tensor {name!r}, which is not in the planned layout")
        file, start, spec = self.places[name]
        nbytes = piece.numel() * piece.element_size()
        if piece.dtype != spec.dtype or offset + nbytes > spec.nbytes:
            raise RuntimeError(
                f"export: {name}: a {piece.dtype} piece of {nbytes} bytes at {offset} does "
                f"not fit the planned {spec.dtype} tensor of {spec.nbytes} bytes"
            )
        if piece.is_floating_point() and not bool(torch.isfinite(piece).all()):
            raise NonFiniteError(
                f"export: {name} holds NaN or infinite values; an unusable model is not "
                "exported (the previous export and checkpoints are kept)"
            )
        if file not in self.fds:
            self.fds[file] = os.open(self.out_dir / self.filenames[file], os.O_WRONLY)
        data, position = memoryview(_host_bytes(piece, held)), start + offset
        try:
            while data:  # pwrite may write less than asked (at most ~2 GiB per call on Linux)
                count = os.pwrite(self.fds[file], data, position)
                data, position = data[count:], position + count
        except OSError as exc:
            if is_disk_full(exc):  # the export's debris is removed (policy.export)
                raise disk_full_error(self.out_dir, self.total_bytes, "the export") from exc
            raise
        return nbytes

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def abandon(self) -> None:
        """After a failure: close what is open; errors ignored (the export has failed already)."""
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def write_index(self) -> None:
        weight_map = {name: self.filenames[i] for name, (i, _, _) in self.places.items()}
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def publish(self, final: Path) -> int:
        """Rank 0, once every rank has written its part: put the export at `final`."""
        (self.out_dir / MARKER_NAME).unlink()
        if final.exists():
            shutil.rmtree(final)
        self.out_dir.rename(final)
        return 1


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


def _host_bytes(tensor: torch.Tensor, held: HeldBytes | None):
    """The tensor's bytes in host memory, as a uint8 array (numpy has no bfloat16): no copy
    where the tensor is already contiguous on the CPU; a copy is counted in `held`."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if held is not None and flat.data_ptr() != tensor.data_ptr():
        held.track(flat)
    return flat.view(torch.uint8).numpy()
