"""The rollout replicas as the controller sees them: capacity, weight versions, sync plans.

Each replica has room for `capacity` prompts (what it is generating plus one batch queued);
prompts go to the replica with the most free room, so a faster replica gets more. A prompt is
handed to a replica only if the result, generated with at least the version last ordered to
that replica, can still be trained within the staleness bound. A replica that registers with
other weights than the policy's (a late joiner, or any replica after a resume) takes no prompt
until a sync to the current weights has been ordered for it. A replica that dies is dropped; if
a sync ordered to it was still open, the others in that sync fall back to the weights they
confirmed holding and catch up with the next sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gantry.comm.protocol import Receiver, SyncPlan


@dataclass
class RolloutReplica:
    name: str
    ranks: int  # weight-receiving (tensor-parallel) ranks
    version: int  # weights ordered to it: the least version its next results can carry
    held: int  # weights it confirmed holding (WeightsSynced), what it falls back to
    in_flight: dict[str, int] = field(default_factory=dict)  # prompt id -> least version
    joined_at: int = 0  # the policy's version when it registered
    groups: int = 0  # results it returned
    syncs: int = 0
    min_result_version: int | None = None
    registered_at: float = field(default_factory=time.monotonic)
    weights_after_s: float | None = None  # registration -> first sync it confirmed
    first_result_after_s: float | None = None  # registration -> first result

    def _since_registered(self) -> float:
        return round(time.monotonic() - self.registered_at, 3)

    def stats(self) -> dict:
        return {
            "ranks": self.ranks,
            "joined_at_version": self.joined_at,
            "groups": self.groups,
            "syncs": self.syncs,
            "min_result_version": self.min_result_version,
            "weights_after_s": self.weights_after_s,
            "first_result_after_s": self.first_result_after_s,
        }


class RolloutFleet:
    def __init__(
        self, *, capacity: int, run_id: str, host: str, port: int, timeout_s: float
    ) -> None:
        self.capacity = capacity
        self.run_id, self.host, self.port, self.timeout_s = run_id, host, port, timeout_s
        self.replicas: dict[str, RolloutReplica] = {}
        self.departed: list[dict] = []  # stats of replicas that left, in order
        self.plans: dict[tuple[tuple[str, int], ...], SyncPlan] = {}
        self.serial = 0

    # ---- membership -------------------------------------------------------------------

    def register(self, name: str, ranks: int, holds_version: int, policy_version: int) -> None:
        if name in self.replicas:  # a restarted process: groups formed with the old one are void
            self.plans = {k: p for k, p in self.plans.items() if name not in dict(k)}
        self.replicas[name] = RolloutReplica(
            name, ranks, version=holds_version, held=holds_version, joined_at=policy_version
        )

    def drop(self, name: str, why: str) -> RolloutReplica:
        """Forget a replica that left the run (and the sync groups it was part of); what it had
        in flight is the caller's to hand out again. Its stats are kept under `departed`."""
        self.plans = {k: p for k, p in self.plans.items() if name not in dict(k)}
        replica = self.replicas.pop(name)
        self.departed.append({"replica": name, "left": why, **replica.stats()})
        return replica

    def confirmed(self, name: str, version: int) -> None:
        replica = self.replicas.get(name)
        if replica is not None:
            replica.held = version
            if replica.weights_after_s is None:
                replica.weights_after_s = replica._since_registered()

    def sync_called_off(self, names: list[str]) -> None:
        """A sync ordered to these replicas was given up: they keep the weights they hold, and
        what they generate from now on (prompts already in flight too) carries that version."""
        for name in names:
            replica = self.replicas.get(name)
            if replica is None:
                continue
            replica.version = replica.held
            for prompt_id, least in replica.in_flight.items():
                replica.in_flight[prompt_id] = min(least, replica.held)

    def behind(self, version: int) -> list[str]:
        """Replicas whose weights are older than `version` (waiting for a catch-up sync)."""
        return sorted(n for n, r in self.replicas.items() if r.version < version)

    def plan(self, names: list[str]) -> SyncPlan:
        """The sync plan of these replicas: the same plan (and process groups) every time the
        membership is the same."""
        members = tuple((n, self.replicas[n].ranks) for n in sorted(names))
        if members not in self.plans:
            self.serial += 1
            self.plans[members] = SyncPlan(
                group=f"{self.run_id}/plan{self.serial}",
                host=self.host,
                port=self.port,
                receivers=[Receiver(replica=n, ranks=r) for n, r in members],
                timeout_s=self.timeout_s,
            )
        return self.plans[members]

    def synced(self, names: list[str], version: int) -> None:
        for name in names:
            self.replicas[name].version = version
            self.replicas[name].syncs += 1

    # ---- prompts ----------------------------------------------------------------------

    @property
    def in_flight(self) -> dict[str, str]:
        """prompt id -> replica generating it."""
        return {p: r.name for r in self.replicas.values() for p in r.in_flight}

    def assign(self, count: int, budget: dict[str, int]) -> list[str]:
        """Replicas for up to `count` prompts, each to the one with the most free room.
        `budget[name]` is how many prompts may be queued in all (buffered results and prompts
        in flight count alike) for one more given to `name` to stay within the staleness bound."""
        picks: list[str] = []
        taken = dict.fromkeys(self.replicas, 0)
        while len(picks) < count:
            free = {
                n: self.capacity - len(r.in_flight) - taken[n]
                for n, r in self.replicas.items()
                if budget.get(n, 0) > len(picks)
            }
            best = max(sorted(free), key=lambda n: free[n], default=None)
            if best is None or free[best] <= 0:
                break
            picks.append(best)
            taken[best] += 1
        return picks

    def dispatched(self, name: str, prompt_id: str) -> None:
        replica = self.replicas[name]
        replica.in_flight[prompt_id] = replica.version

    def returned(self, name: str, prompt_id: str, version: int) -> None:
        replica = self.replicas.get(name)
        if replica is None or prompt_id not in replica.in_flight:
            return  # a duplicate delivery: the buffer accounts for it
        least = replica.in_flight.pop(prompt_id)
        replica.groups += 1
        if replica.first_result_after_s is None:
            replica.first_result_after_s = replica._since_registered()
        if replica.min_result_version is None or version < replica.min_result_version:
            replica.min_result_version = version
        if version < least:
            raise RuntimeError(
                f"rollout replica {name} generated {prompt_id} with weights v{version}, but a "
                f"sync to v{least} was ordered before the prompt was handed to it"
            )

    def stats(self) -> dict[str, dict]:
        return {n: r.stats() for n, r in sorted(self.replicas.items())}

    # ---- a restarted controller -------------------------------------------------------

    def state(self) -> dict:
        """Everything above as JSON; the sync store's port too: the policy hosts that store
        for the whole run."""
        return {
            "port": self.port,
            # vars, not dataclasses.asdict: its deep copy is most of a pass's time otherwise.
            "replicas": [
                {**vars(r), "in_flight": dict(r.in_flight)} for r in self.replicas.values()
            ],
            "departed": self.departed,
            "plans": [[list(k), p.model_dump()] for k, p in self.plans.items()],
            "serial": self.serial,
        }

    def restore(self, state: dict) -> None:
        self.port, self.serial, self.departed = state["port"], state["serial"], state["departed"]
        self.replicas = {r["name"]: RolloutReplica(**r) for r in state["replicas"]}
        self.plans = {
            tuple(tuple(member) for member in members): SyncPlan.model_validate(plan)
            for members, plan in state["plans"]
        }
