"""What a weight sync sends and how it is cut up: the `Manifest` (name, shape, transfer dtype,
rows per sender of every parameter, agreed once), its same-dtype buckets of bounded size that
never split a layer (`plan_buckets`), each bucket's layout on the wire (`BucketLayout`), and the
reused byte buffers buckets are packed into and received in (`Arena`).

Pure bookkeeping: no process group here (those are in `gantry.comm.sync_groups`, the transfer
itself in `gantry.comm.weights`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
# Buckets in flight: one being received (or packed) while the previous one is loaded (or sent).
PIPELINE_DEPTH = 2
# A tensor this large goes in broadcasts of its own, from and into its final place: no copies.
DIRECT_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the transfer dtype, e.g. "bfloat16"
    splits: tuple[int, ...]  # rows of dim 0 held by each sender, in sender order

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Manifest:
    """What a sync sends, agreed once: entries in order, the senders and the bucket size."""

    entries: list[ManifestEntry]
    senders: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    direct_min_bytes: int = DIRECT_MIN_BYTES
    buckets: list[BucketLayout] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for e in self.entries:
            rows = rows_of(e.shape)
            if len(e.splits) != self.senders or sum(e.splits) != rows:
                raise ValueError(f"{e.name}: splits {e.splits} do not cover {rows} rows")
        buckets = plan_buckets(self.entries, self.bucket_bytes)
        layouts = [BucketLayout(b, self.senders, self.direct_min_bytes) for b in buckets]
        object.__setattr__(self, "buckets", layouts)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def to_json(self) -> str:
        entries = [[e.name, list(e.shape), e.dtype, list(e.splits)] for e in self.entries]
        return json.dumps(
            {
                "senders": self.senders,
                "bucket_bytes": self.bucket_bytes,
                "direct_min_bytes": self.direct_min_bytes,
                "entries": entries,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        entries = [
            ManifestEntry(name, tuple(shape), dtype, tuple(splits))
            for name, shape, dtype, splits in data["entries"]
        ]
        return cls(entries, data["senders"], data["bucket_bytes"], data["direct_min_bytes"])


def rows_of(shape: tuple[int, ...] | torch.Size) -> int:
    """Rows of dim 0, the unit shards are cut in (a scalar is one row)."""
    return shape[0] if len(shape) else 1


def even_splits(rows: int, senders: int) -> tuple[int, ...]:
    """Rows per shard when `rows` are cut like FSDP2's Shard(0) (torch.chunk: ceil-sized)."""
    size = -(-rows // senders) if rows else 0
    return tuple(max(0, min(size, rows - i * size)) for i in range(senders))


def layer_of(name: str) -> str:
    """The module that owns the module of parameter `name` (".self_attn" for its q/k/v_proj):
    engines fuse parameters of one such module into one layer (vLLM's qkv_proj, gate_up_proj)."""
    return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""


def plan_buckets(
    entries: list[ManifestEntry], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[list[ManifestEntry]]:
    """Split the entries into same-dtype buckets of at most `bucket_bytes`, never splitting
    the parameters of one layer (a layer larger than the bound goes alone). vLLM processes a
    fused layer once all its parts arrived and holds the earlier ones until then, so a bucket
    whose buffer is reused for the next one must complete every layer it starts."""
    runs: list[list[ManifestEntry]] = []
    for entry in entries:
        last = runs[-1][0] if runs else None
        if last and last.dtype == entry.dtype and layer_of(last.name) == layer_of(entry.name):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    buckets: list[list[ManifestEntry]] = []
    current: dict[str, tuple[list[ManifestEntry], int]] = {}
    for run in runs:
        size = sum(e.nbytes for e in run)
        bucket, used = current.get(run[0].dtype, ([], 0))
        if bucket and used + size > bucket_bytes:
            buckets.append(bucket)
            bucket, used = [], 0
        current[run[0].dtype] = (bucket + run, used + size)
    buckets.extend(bucket for bucket, _ in current.values() if bucket)
    return buckets


class BucketLayout:
    """How one bucket travels. Receivers lay it out as its tensors end to end (`offsets`).
    Each sender sends, in this order: its rows of the small entries packed into one flat
    tensor (if it has any), then its rows of each large entry (>= `direct_min_bytes`) as a
    broadcast of their own, which lands straight at its place in the receivers' layout."""

    def __init__(self, entries: list[ManifestEntry], senders: int, direct_min_bytes: int) -> None:
        self.entries, self.senders = entries, senders
        self.dtype = entries[0].torch_dtype
        self.offsets, numel = [], 0
        for e in entries:
            self.offsets.append(numel)
            numel += e.numel
        self.numel = numel
        self.direct = [e.nbytes >= direct_min_bytes for e in entries]

    def rows_start(self, index: int, sender: int) -> int:
        """Element offset, in the receivers' layout, of `sender`'s rows of entry `index`."""
        entry = self.entries[index]
        return self.offsets[index] + sum(entry.splits[:sender]) * entry.row_numel

    def packed(self, sender: int) -> list[int]:
        return [i for i, e in enumerate(self.entries) if not self.direct[i] and e.splits[sender]]

    def directs(self, sender: int) -> list[int]:
        return [i for i, e in enumerate(self.entries) if self.direct[i] and e.splits[sender]]

    def packed_numel(self, sender: int) -> int:
        return sum(
            self.entries[i].splits[sender] * self.entries[i].row_numel for i in self.packed(sender)
        )


class Arena:
    """A byte buffer reused bucket after bucket and carved into typed regions: memory that is
    already mapped, instead of fresh allocations (page faults) for every bucket of every sync.
    It grows to the largest bucket and never shrinks."""

    ALIGN = 64

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.used = 0

    def reset(self, nbytes: int) -> None:
        """Start a new bucket needing up to `nbytes` (regions of the last one become invalid)."""
        if nbytes > self.buffer.numel():
            self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)  # free first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.used = 0

    @classmethod
    def span(cls, numels: list[int], dtype: torch.dtype) -> int:
        return sum(-(-n * dtype.itemsize // cls.ALIGN) * cls.ALIGN for n in numels)

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        start, self.used = self.used, self.used + -(-nbytes // self.ALIGN) * self.ALIGN
        return self.buffer[start : start + nbytes].view(dtype)


def pipeline_arenas(device: torch.device | str) -> list[Arena]:
    """One arena per bucket in flight. A side takes new ones after a called-off transfer: the
    broadcasts it abandoned may still read or write the old ones."""
    return [Arena(device) for _ in range(PIPELINE_DEPTH)]
