"""Weight sync transport: policy shards broadcast to every rollout rank over torch.distributed.

The policy's weights live in FSDP shards: rows of dim 0 spread over `senders` ranks. Each
sender broadcasts its own rows, never gathering the model anywhere, in its own process group
whose other members are all the receiving ranks (every tensor-parallel rank of every rollout
replica), so each byte leaves the policy once and the senders' broadcasts run side by side.
Receivers put the rows of each tensor back together and hand full tensors to the engine, whose
weight loaders slice them for their TP rank.

Parameters travel in the order of a `Manifest` (name, shape, transfer dtype, rows per sender)
that the policy publishes once, packed into same-dtype buckets of bounded size: one flat
tensor per sender per bucket, one broadcast each, the next bucket posted before the current
one is unpacked. Groups are formed at run time through a TCPStore hosted by policy rank 0 at
the address in the `SyncPlan`, gloo on CPU and NCCL on GPU. Before each sync every member
checks in at the store, so a sync that stalls names the ranks that did not arrive.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from gantry.comm.protocol import SyncPlan

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
# Buckets in flight: one being received (or packed) while the previous one is loaded (or sent).
PIPELINE_DEPTH = 2
# A tensor this large goes in broadcasts of its own, from and into its final place: no copies.
DIRECT_MIN_BYTES = 1 << 20


CALLED_OFF_POLL_S = 0.5  # how often a waiting member looks for a called-off sync
CANCELLED = "called-off"


class SyncCancelled(RuntimeError):
    """The controller called the sync off (a member died). Called off in the check-in,
    nothing was sent; during the transfer, a receiver may hold part of the new weights, and
    the controller's next sync (without the dead member) sends them all again."""


class SyncStalled(RuntimeError):
    """Members of a weight sync did not arrive in time."""


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def backend_for_device() -> str:
    # "cpu:gloo,cuda:nccl" fails on the CPU wheel, so choose by what the machine has.
    return "nccl" if torch.cuda.is_available() else "gloo"


# ---------------------------------------------------------------------------------------------
# The manifest


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


# ---------------------------------------------------------------------------------------------
# Process groups


@dataclass
class SyncGroup:
    """A process group and the store it was formed through (which must outlive it)."""

    group: dist.ProcessGroup
    store: dist.Store

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> dist.Work:
        # On the object: dist.broadcast(group=...) rejects a group it did not register.
        return self.group.broadcast(tensor, root)


def create_group(
    store: dist.Store, prefix: str, rank: int, world_size: int, timeout_s: float
) -> SyncGroup:
    """A process group of `world_size` members meeting under `prefix` in `store`."""
    prefixed = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    if backend_for_device() == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return SyncGroup(group, store)


def connect_store(host: str, port: int, *, host_it: bool, timeout_s: float) -> dist.Store:
    """The sync store: policy rank 0 hosts it, every other member connects to it."""
    return dist.TCPStore(
        host,
        port,
        is_master=host_it,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def sender_name(sender: int) -> str:
    return f"policy sender {sender}"


def receiver_name(replica: str, tp_rank: int) -> str:
    return f"rollout replica {replica} tp rank {tp_rank}"


def member_names(plan: SyncPlan, senders: int) -> list[str]:
    names = [sender_name(s) for s in range(senders)]
    for receiver in plan.receivers:
        names += [receiver_name(receiver.replica, t) for t in range(receiver.ranks)]
    return names


def check_in(
    store: dist.Store,
    plan: SyncPlan,
    senders: int,
    me: str,
    version: int,
    called_off: Callable[[], bool] | None = None,
) -> None:
    """Announce `me` for this sync and wait for every other member, naming those missing.

    A member that died never arrives: the controller then calls the sync off, which a
    sender learns from `called_off` (it polls the control plane) and tells the others through
    the store; every member then raises SyncCancelled instead of waiting out the timeout."""
    prefix = _sync_prefix(plan, version)
    store.set(prefix + me, "1")
    names = member_names(plan, senders)
    keys, cancelled = [prefix + n for n in names], prefix + CANCELLED
    deadline = time.monotonic() + plan.timeout_s
    pause, next_look = 0.001, time.monotonic() + CALLED_OFF_POLL_S
    # Polled with `check`: the store's own `wait` with a short timeout logs a warning per slice.
    while not store.check(keys):
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
        if time.monotonic() >= next_look:
            next_look = time.monotonic() + CALLED_OFF_POLL_S
            if called_off is not None and called_off():
                store.set(cancelled, "1")
            if store.check([cancelled]):
                raise SyncCancelled(
                    f"weight sync v{version} ({plan.group}) was called off by the controller: "
                    "a member left the run"
                )
        missing = (
            [n for n in names if not store.check([prefix + n])]
            if time.monotonic() >= deadline
            else []
        )
        if missing:
            raise SyncStalled(
                f"weight sync v{version} ({plan.group}): {', '.join(missing)} did not arrive "
                f"within {plan.timeout_s:.0f}s (rollout.weight_sync_timeout); {me} gave up"
            )


def _sync_prefix(plan: SyncPlan, version: int) -> str:
    return f"{plan.group}/v{version}/"


def call_off(store: dist.Store, plan: SyncPlan, version: int) -> None:
    """Tell every member of the sync, through the store, that it was called off: members in the
    check-in or in the transfer raise SyncCancelled at their next look."""
    store.set(_sync_prefix(plan, version) + CANCELLED, "1")


def is_called_off(store: dist.Store, plan: SyncPlan, version: int) -> bool:
    return store.check([_sync_prefix(plan, version) + CANCELLED])


# ---------------------------------------------------------------------------------------------
# Sending (a policy rank holding shard `sender` of every entry)


@dataclass(frozen=True)
class SendStats:
    bytes: int
    wait_s: float  # until every member checked in (receivers finishing a generate call)
    send_s: float  # the transfer itself, group formation included on a plan's first sync


class Sender:
    """One policy rank's side of the syncs: its group with all receivers, per plan."""

    def __init__(self, manifest: Manifest, sender: int, store: dist.Store) -> None:
        self.manifest, self.sender, self.store = manifest, sender, store
        self.groups: dict[str, SyncGroup] = {}
        self.arenas = pipeline_arenas(_device())

    def send(
        self,
        plan: SyncPlan,
        version: int,
        local_rows: Callable[[ManifestEntry], torch.Tensor],
        called_off: Callable[[], bool] | None = None,
    ) -> SendStats:
        """Broadcast this rank's rows of every entry (SyncCancelled if `called_off`)."""
        started = time.perf_counter()
        me = sender_name(self.sender)
        check_in(self.store, plan, self.manifest.senders, me, version, called_off)
        arrived = time.perf_counter()
        group = self.groups.get(plan.group)
        if group is None:
            world = 1 + plan.receiver_ranks
            prefix = f"{plan.group}/from{self.sender}"
            group = self.groups[plan.group] = create_group(
                self.store, prefix, 0, world, plan.timeout_s
            )

        def cancelled() -> bool:
            if called_off is not None and called_off():
                call_off(self.store, plan, version)
            return is_called_off(self.store, plan, version)

        in_flight: deque[list[dist.Work]] = deque()
        sent = 0
        try:
            for i, bucket in enumerate(self.manifest.buckets):
                if len(in_flight) == PIPELINE_DEPTH:  # the arena of bucket i - DEPTH is free
                    _wait(in_flight.popleft(), cancelled, version)
                tensors = self._outgoing(bucket, self.arenas[i % PIPELINE_DEPTH], local_rows)
                in_flight.append([group.broadcast(t) for t in tensors])
                sent += sum(t.numel() * t.element_size() for t in tensors)
            while in_flight:
                _wait(in_flight.popleft(), cancelled, version)
        except SyncCancelled:
            self.arenas = pipeline_arenas(_device())  # the abandoned broadcasts keep the old
            raise
        return SendStats(sent, arrived - started, time.perf_counter() - arrived)

    def call_off(self, plan: SyncPlan, version: int) -> None:
        """Release the receivers of a transfer that broke (see `call_off`)."""
        call_off(self.store, plan, version)

    def _outgoing(
        self,
        bucket: BucketLayout,
        arena: Arena,
        local_rows: Callable[[ManifestEntry], torch.Tensor],
    ) -> list[torch.Tensor]:
        """This sender's broadcasts of `bucket`, in the order receivers post them."""
        me = self.sender
        directs = [
            bucket.entries[i].splits[me] * bucket.entries[i].row_numel for i in bucket.directs(me)
        ]
        arena.reset(Arena.span([bucket.packed_numel(me), *directs], bucket.dtype))
        out = []
        packed = bucket.packed(me)
        if packed:
            flat = arena.take(bucket.packed_numel(me), bucket.dtype)
            offset = 0
            for i in packed:
                rows = local_rows(bucket.entries[i]).reshape(-1)
                flat[offset : offset + rows.numel()].copy_(rows)  # casts to the transfer dtype
                offset += rows.numel()
            out.append(flat)
        for i in bucket.directs(me):
            rows = local_rows(bucket.entries[i])
            if rows.dtype != bucket.dtype or not rows.is_contiguous():
                rows = arena.take(rows.numel(), bucket.dtype).copy_(rows.reshape(-1))
            out.append(rows.reshape(-1))  # the shard itself: no copy
        return out


def _wait(works: list[dist.Work], cancelled: Callable[[], bool], version: int) -> None:
    """Until `works` are done, or SyncCancelled once `cancelled()` says the sync was called off:
    when a member dies mid-transfer, a survivor's broadcast may wait on data that never comes
    until the group's timeout (rollout.weight_sync_timeout). Woken by the works' completion,
    not by polling them, so a finished transfer costs no extra latency."""
    done = threading.Event()
    torch.futures.collect_all([w.get_future() for w in works]).add_done_callback(
        lambda _: done.set()
    )
    while not done.wait(CALLED_OFF_POLL_S):
        if cancelled():
            raise SyncCancelled(
                f"weight sync v{version} was called off by the controller during the "
                "transfer: a member left the run"
            )
    for work in works:
        work.wait()  # raises what a failed broadcast raised


# ---------------------------------------------------------------------------------------------
# Receiving (every TP rank of every rollout replica)


class Receiver:
    """One rollout rank's side of the syncs: a group with each sender, per plan."""

    def __init__(self, manifest: Manifest, store: dist.Store, device: torch.device | str) -> None:
        self.manifest, self.store, self.device = manifest, store, torch.device(device)
        self.groups: dict[str, list[SyncGroup]] = {}
        self.arenas = pipeline_arenas(self.device)

    def receive(
        self, plan: SyncPlan, version: int, replica: str, tp_rank: int
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield each bucket's (name, full tensor) pairs as they arrive. The tensors are views
        of a buffer that the bucket after next reuses: load or copy them before asking for
        more. Consume to the end: the senders block until every receiver took every bucket."""
        me = receiver_name(replica, tp_rank)
        check_in(self.store, plan, self.manifest.senders, me, version)
        groups = self._groups(plan, plan.rank_of(replica, tp_rank))
        buckets = self.manifest.buckets
        pending = deque(self._post(groups, i) for i in range(min(PIPELINE_DEPTH, len(buckets))))
        for i, bucket in enumerate(buckets):
            works, full, staging = pending.popleft()
            try:
                _wait(works, lambda: is_called_off(self.store, plan, version), version)
            except SyncCancelled:
                self.arenas = pipeline_arenas(self.device)  # the abandoned receives keep the old
                raise
            _unpack(bucket, full, staging)
            yield [
                (e.name, full[off : off + e.numel].view(e.shape))
                for e, off in zip(bucket.entries, bucket.offsets, strict=True)
            ]
            if i + PIPELINE_DEPTH < len(buckets):  # into the arena bucket i just released
                pending.append(self._post(groups, i + PIPELINE_DEPTH))

    def _groups(self, plan: SyncPlan, rank: int) -> list[SyncGroup]:
        if plan.group not in self.groups:
            world = 1 + plan.receiver_ranks
            self.groups[plan.group] = [
                create_group(self.store, f"{plan.group}/from{s}", rank, world, plan.timeout_s)
                for s in range(self.manifest.senders)
            ]
        return self.groups[plan.group]

    def _post(self, groups: list[SyncGroup], index: int):
        """Post the receives of bucket `index`: direct rows into their place in the bucket's
        layout, packed rows into one staging tensor per sender."""
        bucket = self.manifest.buckets[index]
        arena = self.arenas[index % PIPELINE_DEPTH]
        packed = [bucket.packed_numel(s) for s in range(bucket.senders)]
        arena.reset(Arena.span([bucket.numel, *packed], bucket.dtype))
        full = arena.take(bucket.numel, bucket.dtype)
        staging = [arena.take(n, bucket.dtype) for n in packed]
        works = []
        for sender, group in enumerate(groups):
            if packed[sender]:
                works.append(group.broadcast(staging[sender]))
            for i in bucket.directs(sender):
                start = bucket.rows_start(i, sender)
                n = bucket.entries[i].splits[sender] * bucket.entries[i].row_numel
                works.append(group.broadcast(full[start : start + n]))
        return works, full, staging


def _unpack(bucket: BucketLayout, full: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Copy each sender's packed rows of the small entries to their place in `full`."""
    for sender, flat in enumerate(staging):
        offset = 0
        for i in bucket.packed(sender):
            start = bucket.rows_start(i, sender)
            n = bucket.entries[i].splits[sender] * bucket.entries[i].row_numel
            full[start : start + n].copy_(flat[offset : offset + n])
            offset += n


def receive_and_load(
    receiver: Receiver,
    plan: SyncPlan,
    version: int,
    replica: str,
    tp_rank: int,
    load: Callable[[list[tuple[str, torch.Tensor]]], None],
) -> None:
    """Receive a sync and `load` it bucket by bucket. If loading fails, the rest is still
    received (so the senders and other receivers are not left blocked), then the error raised."""
    error: Exception | None = None
    for weights in receiver.receive(plan, version, replica, tp_rank):
        if error is None:
            try:
                load(weights)
            except Exception as exc:  # re-raised below, once the broadcast is drained
                error = exc
    if error is not None:
        raise error


class WeightReceiver:
    """A rollout rank's receiver across syncs: the store connection and groups are made at
    the first sync and kept; a new manifest (a restarted policy) starts afresh."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.manifest_text: str | None = None
        self.receiver: Receiver | None = None

    def receive(
        self,
        plan: SyncPlan,
        manifest: str,
        version: int,
        replica: str,
        tp_rank: int,
        load: Callable[[list[tuple[str, torch.Tensor]]], None],
    ) -> None:
        if self.receiver is None or manifest != self.manifest_text:
            store = connect_store(plan.host, plan.port, host_it=False, timeout_s=plan.timeout_s)
            self.receiver = Receiver(Manifest.from_json(manifest), store, self.device)
            self.manifest_text = manifest
        receive_and_load(self.receiver, plan, version, replica, tp_rank, load)
