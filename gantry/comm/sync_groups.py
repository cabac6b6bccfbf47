"""The process groups of weight sync and their rendezvous: the store policy rank 0 hosts at the
address in the `SyncPlan`, one group per sender formed through it (gloo on CPU, NCCL on GPU), the
check-in every member makes before each sync (so a sync that stalls names the ranks that did not
arrive), and calling a sync off through the store when a member died.

The transfer over these groups is in `gantry.comm.weights`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from gantry.comm.protocol import SyncPlan
from gantry.comm.store import RUN_STORE_ENV, SINGLE_NODE_HOST, RedisStore, bound_tcp_store
from gantry.comm.sync_status import member_names, receiver_name, sender_name  # noqa: F401
from gantry.comm.torch_compat import nccl_options
from gantry.comm.transport import redis_password

# member_names, receiver_name, sender_name: the names members check in as, defined without torch
# in gantry.comm.sync_status (for the status command) and re-exported by gantry.comm.weights.
CALLED_OFF_POLL_S = 0.5  # how often a waiting member looks for a called-off sync
CANCELLED = "called-off"

# Told who has checked in, as this process's check-ins see it: (group, version, member name ->
# unix time first seen, unix time this check-in began). The store is readable only by the
# sync's members: a listener publishes it (gantry.comm.sync_status.SyncCheckIns, for
# `python -m gantry status`). Process-wide: every check-in of the process reports to them.
CheckInListener = Callable[[str, int, dict[str, float], float], None]
_listeners: list[CheckInListener] = []


def add_check_in_listener(listener: CheckInListener) -> None:
    """Report every check-in of this process to `listener` (at its start, every
    CALLED_OFF_POLL_S while it waits, and when every member arrived)."""
    _listeners.append(listener)


def remove_check_in_listener(listener: CheckInListener) -> None:
    _listeners.remove(listener)


class SyncCancelled(RuntimeError):
    """The controller called the sync off (a member died). Called off in the check-in,
    nothing was sent; during the transfer, a receiver may hold part of the new weights, and
    the controller's next sync (without the dead member) sends them all again."""


class SyncStalled(RuntimeError):
    """Members of a weight sync did not arrive in time."""


def backend_for_device() -> str:
    # "cpu:gloo,cuda:nccl" fails on the CPU wheel, so choose by what the machine has.
    return "nccl" if torch.cuda.is_available() else "gloo"


def backend_for_members(devices: list[str]) -> str:
    """The backend of a group whose members compute on `devices` (a GPU's UUID, "" on CPU):
    NCCL when each member has a GPU of its own; gloo on CPU, and when two members share a GPU
    (a one-GPU node's policy and transformers rollout), which NCCL refuses ("Duplicate GPU
    detected"); gloo broadcasts CUDA tensors through host memory."""
    if not all(devices) or len(set(devices)) < len(devices):
        return "gloo"
    return "nccl"


def _device_uuid() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return str(props.uuid)


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
    backend = backend_for_device()
    if backend == "nccl":  # every member tells its GPU, so that all pick the same backend
        prefixed.set(f"device/{rank}", _device_uuid())
        keys = [f"device/{r}" for r in range(world_size)]
        prefixed.wait(keys, timeout)
        backend = backend_for_members([prefixed.get(k).decode() for k in keys])
    if backend == "nccl":
        options = nccl_options(timeout)  # a private field of torch's: see gantry.comm.torch_compat
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return SyncGroup(group, store)


def connect_store(host: str, port: int, *, host_it: bool, timeout_s: float) -> dist.Store:
    """The sync store: policy rank 0 hosts it, every other member connects to it.

    On one node (127.0.0.1) a TCPStore that listens there only, not on every interface as a
    TCPStore does by itself: its host is handed a socket already bound there. Across nodes
    (the launcher then puts RUN_STORE_ENV in every process's environment) the run's Redis,
    which wants the run's secret: a TCPStore would take any peer."""
    run_store = os.environ.get(RUN_STORE_ENV, "")
    if host == SINGLE_NODE_HOST or not run_store:
        return bound_tcp_store(host, port, is_master=host_it, timeout_s=timeout_s)
    url, prefix = run_store.split(" ", 1)
    return RedisStore(url, redis_password(), f"{prefix}{host}:{port}/", timeout_s)


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
    report = _Arrivals(plan.group, version, prefix, names) if _listeners else None
    if report is not None:
        report.look(store)
    keys, cancelled = [prefix + n for n in names], prefix + CANCELLED
    deadline = time.monotonic() + plan.timeout_s
    pause, next_look = 0.001, time.monotonic() + CALLED_OFF_POLL_S
    # Polled with `check`: the store's own `wait` with a short timeout logs a warning per slice.
    while not store.check(keys):
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
        if time.monotonic() >= next_look:
            next_look = time.monotonic() + CALLED_OFF_POLL_S
            if report is not None:
                report.look(store)
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
    if report is not None:
        report.all_arrived()


@dataclass
class _Arrivals:
    """The members of one sync seen checked in so far, told to the listeners when it grows."""

    group: str
    version: int
    prefix: str
    names: list[str]
    opened: float = field(default_factory=time.time)
    arrived: dict[str, float] = field(default_factory=dict)

    def look(self, store: dist.Store) -> None:
        now = time.time()
        new = {
            n: now for n in self.names if n not in self.arrived and store.check([self.prefix + n])
        }
        if new:
            self.arrived.update(new)
            self._tell()

    def all_arrived(self) -> None:
        now = time.time()
        if len(self.arrived) < len(self.names):
            self.arrived.update({n: now for n in self.names if n not in self.arrived})
            self._tell()

    def _tell(self) -> None:
        for listener in list(_listeners):
            listener(self.group, self.version, dict(self.arrived), self.opened)


def _sync_prefix(plan: SyncPlan, version: int) -> str:
    return f"{plan.group}/v{version}/"


def call_off(store: dist.Store, plan: SyncPlan, version: int) -> None:
    """Tell every member of the sync, through the store, that it was called off: members in the
    check-in or in the transfer raise SyncCancelled at their next look."""
    store.set(_sync_prefix(plan, version) + CANCELLED, "1")


def is_called_off(store: dist.Store, plan: SyncPlan, version: int) -> bool:
    return store.check([_sync_prefix(plan, version) + CANCELLED])
