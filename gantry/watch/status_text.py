"""The status of a run as one screen of plain text, headed by who the run waits for.

`waits(status)` names the processes progress depends on now: the members of an open weight
sync that have not checked in (or, without published check-ins, the replicas that have not
confirmed it), with their last heartbeat and what they are doing, e.g.
    sync 4: waiting for rollout 1 (last heartbeat 12 s ago, generating since 40 s)
and any process whose heartbeat stopped. `render(status)` is the whole screen.
"""

from __future__ import annotations

from gantry.run.runtime import HEARTBEAT_TTL_S
from gantry.watch.status import OpenSync, Process, RunStatus

# A heartbeat older than this (3 beats missed) is shown as a stopped process.
STALE_BEAT_S = 6.0


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def describe(process: Process | None, now: float, name: str = "") -> str:
    """`rollout 1 (last heartbeat 12 s ago, generating since 40 s: 8 prompts)`."""
    if process is None:
        return f"{name} (no heartbeat, never registered)"
    if process.beat_age is None:
        return (
            f"{process.name} (no heartbeat for over {HEARTBEAT_TTL_S:.0f} s: "
            "dead, stopped, or cut off)"
        )
    facts = [f"last heartbeat {ago(process.beat_age)} ago"]
    activity = process.activity
    if activity:
        doing = f"{activity.get('state', '?')} since {ago(now - activity.get('since', now))}"
        if activity.get("detail"):
            doing += f": {activity['detail']}"
        facts.append(doing)
    if process.beat_age > STALE_BEAT_S:
        facts.append("its heartbeat stopped: stopped or hung?")
    return f"{process.name} ({', '.join(facts)})"


def _member_process(member: str) -> tuple[str, str]:
    """The (role, replica) of a sync member's name (gantry.comm.sync_status)."""
    if member.startswith("rollout replica "):
        return "rollout", member.removeprefix("rollout replica ").rsplit(" tp rank ", 1)[0]
    return "policy", "0"  # the senders are ranks of the policy's first replica


def sync_wait(sync: OpenSync, status: RunStatus) -> str:
    """One line: who sync `sync.version` waits for, and why it is thought so."""
    head = f"sync {sync.version}"
    if sync.ordered_at is not None:
        head += f" (ordered {ago(status.now - sync.ordered_at)} ago)"
    if sync.arrived is not None and sync.members:
        missing = [m for m in sync.members if m not in sync.arrived]
        if missing:
            processes = list(dict.fromkeys(_member_process(m) for m in missing))
            who = "; ".join(
                describe(status.process(*p), status.now, f"{p[0]} {p[1]}") for p in processes
            )
            return f"{head}: waiting for {who} (not checked in: {', '.join(missing)})"
        if not sync.unconfirmed:
            return f"{head}: every member checked in, transfer under way"
        head += ": every member checked in; transfer or loading"
    if not sync.unconfirmed:
        return f"{head}: waiting for the policy to send"
    who = "; ".join(describe(status.process("rollout", r), status.now) for r in sync.unconfirmed)
    return f"{head}: waiting for {who}"


def waits(status: RunStatus) -> list[str]:
    """What the run waits for now, most telling first."""
    lines = [sync_wait(sync, status) for sync in status.syncs]
    named = {("rollout", replica) for sync in status.syncs for replica in sync.unconfirmed}
    for process in status.processes:
        stopped = process.beat_age is None or process.beat_age > STALE_BEAT_S
        if stopped and (process.role, process.replica) not in named:
            lines.append(f"no heartbeat: {describe(process, status.now)}")
    if not lines:
        lines.append(_flow(status))
    return lines


def _flow(status: RunStatus) -> str:
    """Nothing is stuck: say what the step in progress waits for."""
    state = status.state
    if state is None:
        return "the controller has not committed its state yet (starting)"
    if not state.get("started"):
        return "starting: waiting for every worker to register"
    if state.get("in_flight"):
        policy = status.process("policy", "0")
        return f"step {state.get('steps_sent')}: {describe(policy, status.now, 'policy 0')}"
    if status.algorithm == "sft":
        return "the controller is preparing the next batch"
    dispatched = sum(p.dispatched for p in status.pending.values())
    return f"the controller waits for rollouts to fill a batch ({dispatched} prompts in flight)"


def render(status: RunStatus) -> str:
    """The whole screen."""
    state = status.state or {}
    step = state.get("version", 0)
    total = f" of {status.total_steps}" if status.total_steps else ""
    controller = (
        f"controller's last message read {ago(status.controller_idle_s)} ago"
        if status.controller_idle_s is not None
        else "controller: no message read yet"
    )
    lines = [
        f"run {status.run_id} ({status.algorithm.upper()}): step {step}{total} | {controller}",
        "",
        "waiting for:",
        *(f"  {line}" for line in waits(status)),
        "",
        *_process_table(status),
    ]
    if status.pending:
        lines += ["", "prompts in flight (dispatched / read by the replica, oldest read):"]
        for replica, pending in status.pending.items():
            oldest = f", oldest {ago(pending.oldest_s)}" if pending.oldest_s is not None else ""
            lines.append(f"  rollout {replica}: {pending.dispatched} / {pending.read}{oldest}")
    lines += ["", *_syncs(status)]
    if status.algorithm == "grpo":
        lines += _staleness(status)
    return "\n".join(lines)


def _process_table(status: RunStatus) -> list[str]:
    header = f"  {'process':<12} {'rank':>4} {'pid':>8} {'host':<14} {'beat':>8}  doing"
    rows = ["processes:", header]
    for p in status.processes:
        a = p.activity or {}
        doing = "registered, no heartbeat" if p.beat_age is None else "(bare heartbeat)"
        if a:
            doing = f"{a.get('state', '?')} for {ago(status.now - a.get('since', status.now))}"
            doing += f": {a['detail']}" if a.get("detail") else ""
        beat = ago(p.beat_age) if p.beat_age is not None else "-"
        rank, pid, host = a.get("rank", ""), a.get("pid", ""), str(a.get("host", ""))[:14]
        rows.append(f"  {p.name:<12} {rank!s:>4} {pid!s:>8} {host:<14} {beat:>8}  {doing}")
    if not status.processes:
        rows.append("  (no heartbeat yet)")
    return rows


def _syncs(status: RunStatus) -> list[str]:
    if not status.syncs:
        return ["weight syncs: none open"]
    lines = ["weight syncs open:"]
    for sync in status.syncs:
        if sync.arrived is None:
            arrived = "check-ins not published"
        else:
            arrived = f"checked in: {', '.join(sorted(sync.arrived)) or 'nobody'}"
            missing = [m for m in sync.members if m not in sync.arrived]
            arrived += f"; not yet: {', '.join(missing)}" if missing else ""
        unconfirmed = ", ".join(f"rollout {r}" for r in sync.unconfirmed) or "nobody"
        lines.append(f"  sync {sync.version} ({sync.group}): {arrived}; to confirm: {unconfirmed}")
    return lines


def _staleness(status: RunStatus) -> list[str]:
    state = status.state or {}
    sent, version = state.get("steps_sent", 0), state.get("version", 0)
    k = status.max_staleness
    window = f"max_staleness {k}: " if k is not None else ""
    trainable = f"results from v{max(sent - k, 0)} on are trainable" if k is not None else ""
    replicas = (state.get("fleet") or {}).get("replicas", [])
    holds = ", ".join(
        f"rollout {r['name']} v{r['held']} (ordered v{r['version']})" for r in replicas
    )
    versions: dict[int, int] = {}
    for r in replicas:
        for least in r.get("in_flight", {}).values():
            versions[least] = versions.get(least, 0) + 1
    flying = ", ".join(f"v{v}: {n}" for v, n in sorted(versions.items())) or "none"
    return [
        f"staleness: policy at v{version}, {sent} batches sent; {window}{trainable}",
        f"  weights: {holds or 'no rollout replica'}; prompts in flight by least version: {flying}",
    ]
