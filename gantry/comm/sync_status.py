"""Weight-sync check-ins made visible in Redis, for `python -m gantry status`.

The members of a weight sync check in at the sync's TCPStore (`gantry.comm.sync_groups.
check_in`), which nothing outside the sync can read. A process that calls
`sync_groups.add_check_in_listener(SyncCheckIns(client, keys))` once also writes what its
check-ins see to a Redis hash per sync version, `<run prefix>sync:<version>`: member name ->
the unix time it was seen checked in, plus `group` and `opened` (when this process began its
check-in). A sender sees every member arrive, so one listener on the policy side shows the
whole sync; the hash expires `TTL_S` after its last write.

No torch here: the status command reads these hashes with `read_check_ins`.
"""

from __future__ import annotations

from typing import Any

from gantry.comm.protocol import Keys, SyncPlan

TTL_S = 3600
# Fields of the hash that are not members.
GROUP_FIELD, OPENED_FIELD = "group", "opened"


def sender_name(sender: int) -> str:
    """A policy sender's name in a sync (the check-in's member name)."""
    return f"policy sender {sender}"


def receiver_name(replica: str, tp_rank: int) -> str:
    """A rollout rank's name in a sync."""
    return f"rollout replica {replica} tp rank {tp_rank}"


def member_names(plan: SyncPlan, senders: int) -> list[str]:
    names = [sender_name(s) for s in range(senders)]
    for receiver in plan.receivers:
        names += [receiver_name(receiver.replica, t) for t in range(receiver.ranks)]
    return names


def check_ins_key(keys: Keys, version: int) -> str:
    return f"{keys.prefix}sync:{version}"


class SyncCheckIns:
    """A check-in listener writing to Redis (`client`: a redis-py client of the run)."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client, self.keys = client, keys

    def __call__(self, group: str, version: int, arrived: dict[str, float], opened: float) -> None:
        """`arrived`: member name -> when it was first seen checked in (unix time)."""
        key = check_ins_key(self.keys, version)
        pipe = self.client.pipeline(transaction=False)
        # HSETNX keeps the earliest time any listener saw for a member.
        pipe.hsetnx(key, GROUP_FIELD, group)
        pipe.hsetnx(key, OPENED_FIELD, repr(opened))
        for member, seen in arrived.items():
            pipe.hsetnx(key, member, repr(seen))
        pipe.expire(key, TTL_S)
        pipe.execute()


def read_check_ins(client: Any, keys: Keys, version: int) -> dict[str, Any] | None:
    """{"group", "opened", "arrived": {member: unix time}} of sync `version`; None when no
    listener published it (or it expired)."""
    raw = client.hgetall(check_ins_key(keys, version))
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    group = fields.pop(GROUP_FIELD, "")
    opened = float(fields.pop(OPENED_FIELD, "nan"))
    return {"group": group, "opened": opened, "arrived": {m: float(t) for m, t in fields.items()}}
