"""gantry.run.deadline: work past its deadline is named and its process exits; work within it
is not disturbed. Deadlines follow the slowest unit measured so far (scaled to the unit's size),
never below the floor, the first unit of a kind getting the start-up bound; the controller names
a worker whose heartbeat lapsed with what it was doing, and one whose heartbeat says it is past
its deadline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from types import MethodType, SimpleNamespace

import pytest

from gantry.run.activity import Activity, decode_heartbeat
from gantry.run.deadline import Deadlines, Units, describe, overdue

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from gantry.run.deadline import Watchdog

    watchdog = Watchdog(on_expiry=lambda text: print("expired:", text, flush=True))
    for _ in range(20):  # many short calls, each well within its limit
        with watchdog.limit(0.5, lambda: "quick"):
            time.sleep(0.01)
    with watchdog.limit(0, lambda: "unlimited"):
        time.sleep(0.7)
    time.sleep(0.7)  # outside any limit
    # Another thread's limit and an outer one, both longer: the inner, shorter one counts.
    other = threading.Thread(
        target=lambda: watchdog.limit(30, lambda: "other thread").__enter__(), daemon=True
    )
    other.start()
    other.join()
    print("quick ones done", flush=True)
    if sys.argv[1] == "hang":
        with watchdog.limit(20, lambda: "policy step 7"):
            with watchdog.limit(0.5, lambda: "reward function f on sample 7", "why"):
                time.sleep(60)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["ok", "hang"])
def test_a_call_past_its_deadline_is_named_and_ends_the_process(mode):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=50
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "quick ones done", done.stdout + done.stderr
    if mode == "ok":
        assert done.returncode == 0 and len(lines) == 1
    else:
        assert done.returncode == 1
        expected = "expired: reward function f on sample 7 did not return within 0.5 s (why)"
        assert lines[1] == expected
        assert time.monotonic() - started < 15  # not the 20 s of the outer limit, nor 60


def test_deadlines_start_generous_then_follow_the_slowest_unit_scaled_to_its_size():
    deadlines = Deadlines(factor=3.0, floor_s=10.0, first_s=600.0)
    seconds, why = deadlines.seconds_for("policy step", work=1000)
    assert seconds == 600.0 and "first policy step" in why and "first_deadline_s" in why
    deadlines.record("policy step", 2.0, work=1000)  # 2 ms per token
    deadlines.record("policy step", 1.0, work=1000)  # faster: the slowest stays
    seconds, why = deadlines.seconds_for("policy step", work=4000)
    assert seconds == pytest.approx(3.0 * 0.002 * 4000) and "3 x the slowest" in why
    assert deadlines.seconds_for("policy step", work=100) == (
        10.0,
        "fault_tolerance.deadline_floor_s",
    )
    seconds, why = deadlines.seconds_for("policy step", work=1000, estimate_s=99.0)
    assert seconds == 99.0 and "worst case" in why
    assert deadlines.best_rate("policy step") == pytest.approx(0.001)
    assert deadlines.seconds_for("export")[0] == 600.0  # each kind has its own history
    off = Deadlines(enabled=False)
    assert off.seconds_for("policy step") == (0.0, "")


def test_deadlines_come_from_the_fault_tolerance_section():
    from gantry.config.cluster import FaultToleranceConfig

    section = FaultToleranceConfig(deadline_factor=4, deadline_floor_s=30, first_deadline_s=90)
    deadlines = Deadlines.from_config(section)
    assert (deadlines.factor, deadlines.floor_s, deadlines.first_s) == (4, 30, 90)
    assert Deadlines.from_config(FaultToleranceConfig(deadlines=False)).enabled is False


def test_a_unit_is_published_with_its_deadline_and_measured():
    activity = Activity("rollout", "1")
    limits: list[tuple[float, str, str]] = []

    class Recorder:
        def limit(self, seconds, what, why=""):
            limits.append((seconds, what(), why))
            return __import__("contextlib").nullcontext()

    units = Units(activity, Recorder(), Deadlines(factor=3, floor_s=0.01, first_s=50))
    with units.run("weight sync", "syncing", "weights v3", extra_s=600):
        during = decode_heartbeat(activity.encode())
        time.sleep(0.05)
    assert during["state"] == "syncing" and during["detail"] == "weights v3"
    assert during["deadline_s"] == 650 and "+ 600 s" in during["deadline_why"]
    assert limits == [(650, "syncing weights v3", during["deadline_why"])]
    after = decode_heartbeat(activity.encode())
    assert after["state"] == "idle" and after["deadline_s"] == 0
    assert units.deadlines.slowest["weight sync"] >= 0.05
    with pytest.raises(KeyError), units.run("export", "exporting", "step 3"):
        raise KeyError("a failed unit is not measured")
    assert "export" not in units.deadlines.slowest


def test_a_heartbeat_past_its_deadline_is_overdue_with_what_it_does():
    now = time.time()
    snapshot = {
        "state": "generating", "detail": "16 prompts (weights v7)", "since": now - 312,
        "beat": now - 1, "deadline_s": 100.0, "deadline_why": "3 x the slowest generate so far",
    }  # fmt: skip
    assert overdue(snapshot, now, grace_s=300) is None  # its own watchdog has the first go
    text = overdue(snapshot, now, grace_s=30)
    assert text == (
        "stuck: generating 16 prompts (weights v7) running for 312 s, deadline 100 s "
        "(3 x the slowest generate so far)"
    )
    assert overdue({**snapshot, "deadline_s": 0}, now, grace_s=0) is None  # idle: no limit
    assert overdue(None, now, grace_s=0) is None
    said = describe(snapshot, now)
    assert (
        said == "while generating 16 prompts (weights v7), for 312 s (its last heartbeat 1 s ago)"
    )


THREAD = textwrap.dedent(
    """
    import threading, time
    from gantry.run.deadline import exit_on_thread_error

    exit_on_thread_error(lambda text: print("reported:", text, flush=True))
    def work():
        raise ConnectionError("redis went away")
    threading.Thread(target=work, name="heartbeat").start()
    time.sleep(30)
    print("the process went on without its thread", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_an_error_that_ends_a_thread_ends_the_process_through_its_failure_path():
    done = subprocess.run(
        [sys.executable, "-c", THREAD], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == "reported: thread heartbeat: ConnectionError: redis went away\n"
    assert "Traceback" in done.stderr  # the thread's traceback stays in the log


@pytest.mark.redis
def test_the_controller_names_a_lapsed_or_overdue_worker_with_what_it_was_doing(redis_url):
    from controller.controller import Controller
    from controller.plan import RunFailed
    from gantry.comm.protocol import Keys
    from gantry.comm.transport import ControlPlane

    plane, keys = ControlPlane(redis_url), Keys("run1")
    lost: list[tuple[str, str, str]] = []
    controller = SimpleNamespace(
        context=SimpleNamespace(plane=plane, keys=keys),
        state=SimpleNamespace(registered={("rollout", "0"), ("rollout", "1"), ("policy", "0")}),
        plan=SimpleNamespace(worker_lost=lambda *lost_one: lost.append(lost_one)),
        _last_heartbeat_check=0.0,
        _last_seen={},
    )
    check = MethodType(Controller._check_heartbeats, controller)
    generating = Activity("rollout", "1")
    generating.set("generating", "16 prompts (weights v7)", deadline=(300.0, "the floor"))
    for replica in ("0", "1"):
        plane.beat(keys.heartbeat("rollout", replica), 30, generating.encode())
    plane.beat(keys.heartbeat("policy", "0"), 30, Activity("policy", "0").encode())
    check()
    assert lost == []
    plane.redis.delete(keys.heartbeat("rollout", "1"))  # lapsed, as a SIGSTOPped one's does
    stuck = decode_heartbeat(generating.encode())
    stuck["since"] -= 400  # its own watchdog did not end it: 400 s in a 300 s unit
    plane.beat(keys.heartbeat("rollout", "0"), 30, json.dumps(stuck).encode())
    controller._last_heartbeat_check = 0.0
    check()
    assert [(role, replica) for role, replica, _ in lost] == [("rollout", "0"), ("rollout", "1")]
    assert lost[0][2].startswith("stuck: generating 16 prompts (weights v7) running for 40")
    assert lost[1][2].startswith(
        "stopped sending heartbeats (hung or stopped) while generating 16 prompts (weights v7)"
    )
    controller.state.registered = {("policy", "0")}
    plane.redis.delete(keys.heartbeat("policy", "0"))
    controller._last_heartbeat_check = 0.0
    with pytest.raises(
        RunFailed, match=r"policy replica 0 stopped sending heartbeats .* while starting"
    ):
        check()
    plane.close()


def test_a_supervisor_sees_a_lapse_only_after_a_beat_and_an_overdue_unit_after_its_grace():
    from gantry.run.deadline import lapsed_or_overdue

    seen: dict = {}
    assert lapsed_or_overdue(seen, "rollout0", None) == ""  # not up yet
    busy = Activity("rollout", "0")
    busy.set("generating", "4 prompts (weights v1)", deadline=(10.0, "floor"))
    assert lapsed_or_overdue(seen, "rollout0", busy.encode()) == ""
    lapsed = lapsed_or_overdue(seen, "rollout0", None)
    assert lapsed.startswith("stopped sending heartbeats (hung or stopped) while generating 4")
    late = decode_heartbeat(busy.encode())
    late["since"] -= 45
    value = json.dumps(late).encode()
    assert lapsed_or_overdue(seen, "rollout0", value) == ""  # within 10 s + 2 TTLs (60 s)
    assert lapsed_or_overdue(seen, "rollout0", value, grace_s=30).startswith("stuck: generating")
