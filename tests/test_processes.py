"""The launcher's supervision of child processes: failures are named, the others stopped."""

import os
import signal
import time

import pytest

from gantry.launch import lifeline
from gantry.launch.processes import ProcessGroupSupervisor

pytestmark = pytest.mark.timeout(60)


def test_a_dying_child_stops_the_others_and_is_named(tmp_path, capsys):
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    sleeper = supervisor.start(
        "policy0", ["-c", "import time; print('up', flush=True); time.sleep(60)"]
    )
    supervisor.start(
        "rollout0", ["-c", "import sys; print('about to fail', flush=True); sys.exit(3)"]
    )
    started = time.monotonic()
    code = supervisor.wait(main="policy0")
    supervisor.stop_all()
    assert code == 1
    assert time.monotonic() - started < 20
    assert sleeper.process.poll() is not None  # stopped by the supervisor
    err = capsys.readouterr().err
    assert "rollout0" in err and "exit code 3" in err and "about to fail" in err
    assert (tmp_path / "logs" / "rollout0.log").read_text() == "about to fail\n"


def test_success_when_main_exits_and_the_others_follow(tmp_path, capsys):
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    supervisor.start("controller", ["-c", "print('done')"])
    supervisor.start("policy0", ["-c", "import time; time.sleep(0.5)"])
    assert supervisor.wait(main="controller") == 0
    supervisor.stop_all()
    assert "[controller] done" in capsys.readouterr().out


def test_stop_all_kills_a_child_that_ignores_sigterm(tmp_path, monkeypatch):
    import gantry.launch.processes as processes

    monkeypatch.setattr(processes, "STOP_GRACE_S", 1.0)
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(60)"
    child = supervisor.start("stubborn", ["-c", code])
    # SIGTERM only meets the handler once the child said so (its first line).
    deadline = time.monotonic() + 30
    while "x\n" not in child.tail:
        assert time.monotonic() < deadline, "the child never printed its first line"
        time.sleep(0.01)
    supervisor.stop_all()
    assert child.process.poll() is not None
    assert child.process.returncode == -signal.SIGKILL  # SIGTERM was ignored
    with pytest.raises(ProcessLookupError):
        os.kill(child.process.pid, 0)


def test_a_child_restarted_runs_again_with_its_arguments_until_the_restart_is_refused(
    tmp_path, capsys
):
    """A controller that dies starts again (same arguments and environment, log appended)
    while the others run on; once `restart` says no, its death fails the run."""
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    sleeper = supervisor.start("policy0", ["-c", "import time; time.sleep(60)"])
    script = "import os, sys; print('run', os.environ['MARK'], flush=True); sys.exit(9)"
    supervisor.start("controller", ["-c", script], {"MARK": "m"})
    asked: list[tuple[str, int]] = []

    def restart(name: str, code: int) -> bool:
        asked.append((name, code))
        return len(asked) <= 2

    assert supervisor.wait(main="controller", restart=restart) == 1
    assert sleeper.process.poll() is None  # ran on through both restarts
    supervisor.stop_all()
    assert asked == [("controller", 9)] * 3
    assert (tmp_path / "logs" / "controller.log").read_text() == "run m\n" * 3
    err = capsys.readouterr().err
    assert err.count("starting it again, the others running on") == 2
    assert "stopping the other processes" in err


# A child that starts a grandchild in a session of its own (as torchrun starts its ranks) and
# says the grandchild's pid.
SPAWNER = (
    "import subprocess, sys, time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
    "start_new_session=True); print(g.pid, flush=True); time.sleep(120)"
)


def grandchild_of(child, timeout: float = 30) -> lifeline.Ident:
    deadline = time.monotonic() + timeout
    while not child.tail:
        assert time.monotonic() < deadline, "the child never said its grandchild's pid"
        time.sleep(0.05)
    pid = int(child.tail[0])
    return pid, lifeline.start_time(pid)


def test_stop_all_kills_a_stopped_grandchild_in_another_session(tmp_path):
    """A SIGSTOPped process holds SIGTERM pending forever and a group signal misses another
    session: it is found by parent links and SIGKILLed."""
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    child = supervisor.start("policy0", ["-c", SPAWNER])
    grandchild = grandchild_of(child)
    os.kill(grandchild[0], signal.SIGSTOP)
    started = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while lifeline.is_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lifeline.is_alive(grandchild)


@pytest.mark.slow
def test_a_child_whose_heartbeat_lapsed_is_killed_with_what_it_started(tmp_path, capsys):
    """A hung (here SIGSTOPped) rollout replica is killed, its tree too, and then counts as
    lost like one that died; the run goes on with the others."""
    import gantry.launch.processes as processes

    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    processes.CHECK_INTERVAL_S = 0.2
    try:
        supervisor.start("controller", ["-c", "import time; time.sleep(4)"])
        hung = supervisor.start("rollout0", ["-c", SPAWNER])
        supervisor.start("rollout1", ["-c", "import time; time.sleep(5)"])
        grandchild = grandchild_of(hung)
        os.kill(hung.process.pid, signal.SIGSTOP)
        lost: list[str] = []
        code = supervisor.wait(
            main="controller",
            expendable=lambda name: name.startswith("rollout"),
            on_lost=lambda name, how: lost.append(f"{name}: {how}"),
            hung=lambda name: name == "rollout0" and lifeline.is_stopped(hung.process.pid),
        )
    finally:
        processes.CHECK_INTERVAL_S = 2.0
        supervisor.stop_all()
    assert lost == ["rollout0: signal SIGKILL"]
    assert code == 0  # the controller finished, rollout1 with it
    assert not lifeline.is_alive(grandchild)
    err = capsys.readouterr().err
    assert "rollout0 (pid" in err and "stopped sending heartbeats" in err


def test_a_failure_is_one_line_with_the_cause_and_the_log(tmp_path, capsys):
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    script = "import sys; print('noise'); raise ValueError('policy.model_max_length too big')"
    supervisor.start("policy0", ["-c", script])
    assert supervisor.wait(main=None) == 1
    supervisor.stop_all()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[launcher]")]
    assert len(lines) == 1, lines
    assert "policy0 (pid" in lines[0] and "exit code 1" in lines[0]
    assert "ValueError: policy.model_max_length too big" in lines[0]
    assert str(tmp_path / "logs" / "policy0.log") in lines[0]
    assert supervisor.failure.name == "policy0"


def test_a_child_past_its_deadline_is_killed_and_named_with_what_it_was_doing(
    tmp_path, capsys, monkeypatch
):
    """`hung` may say why (a deadline long past while the heartbeat still beats): the line
    says so, and the child is killed (not left running after the controller dropped it)."""
    import gantry.launch.processes as processes

    monkeypatch.setattr(processes, "CHECK_INTERVAL_S", 0.1)
    supervisor = ProcessGroupSupervisor(tmp_path / "logs")
    stuck = supervisor.start("rollout1", ["-c", "import time; time.sleep(60)"])
    why = "stuck: generating 2 prompts (weights v3) running for 400 s, deadline 300 s (floor)"
    lost: list[str] = []
    started = time.monotonic()
    try:
        code = supervisor.wait(
            main=None,
            expendable=lambda name: True,
            on_lost=lambda name, how: lost.append(f"{name}: {how}"),
            hung=lambda name: why,
        )
    finally:
        supervisor.stop_all()
    assert code == 1 and lost == ["rollout1: signal SIGKILL"]  # the only expendable one
    assert stuck.process.returncode == -signal.SIGKILL and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"rollout1 (pid {stuck.process.pid}) {why}: killing it" in err
