"""The launcher's console and its bookkeeping, piece by piece: which lines of a process reach
the console, the one line that names a failure's cause, the last step of an interrupted run,
start-up errors that a retry would meet again, and processes that die with their launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gantry.config import ConfigError
from gantry.data.plugin import DatasetScriptError
from gantry.launch import lifeline, outcome
from gantry.launch.attempt import ControllerRestarts, StopSignals
from gantry.launch.console import cause_of, is_gantry_line
from gantry.run.errors import NonFiniteError
from gantry.run.runtime import EXIT_BAD_INPUT, FATAL_FILE, is_deterministic, record_fatal

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)


def test_gantry_lines_are_told_from_library_lines_by_setup_logging():
    """Gantry's loggers write `HH:MM:SS LEVEL message`; another library's logger propagating
    to the root logger is tagged with its name, and the console leaves it out."""
    code = textwrap.dedent(
        """
        import logging
        from gantry.run.runtime import setup_logging
        setup_logging("rollout").info("engine up")
        logging.getLogger("policy.worker").warning("slow step")
        logging.getLogger("vllm.triton_utils").warning("Triton is installed, but no CPU backend")
        print("Loading safetensors checkpoint shards: 100%", flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.splitlines()
    assert len(out) == 4, out
    assert [is_gantry_line(line) for line in out] == [True, True, False, False], out
    assert "[vllm.triton_utils] Triton" in out[2]
    assert is_gantry_line("12:00:01 WARNING rank1 sync slow")


def test_the_cause_is_the_last_error_line_else_the_traceback_s_last_line():
    traceback_tail = [
        "12:00:00 INFO policy ready\n",
        "Traceback (most recent call last):\n",
        '  File "x.py", line 1, in <module>\n',
        "ValueError: policy.model_max_length = 9000 is above 4096\n",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n",
        "============================================================\n",
    ]
    assert cause_of(traceback_tail).startswith("torch.distributed.elastic")
    reported = [*traceback_tail[:4], "12:00:01 ERROR policy 0 failed: ValueError: too long\n"]
    reported += traceback_tail[4:]
    assert cause_of(reported) == "policy 0 failed: ValueError: too long"
    assert cause_of(["step 3\n"]) == "step 3"
    assert cause_of(["step 3\n"], last_resort=False) == ""


def test_last_step_skips_validation_and_a_cut_line(tmp_path):
    assert outcome.last_step(tmp_path) == 0
    records = [{"step": 1, "loss": 2.0}, {"step": 2}, {"validation": True, "step": 2}, {"step": 1}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    # The run started again from step 0's checkpoint: its last record says where it stood.
    assert outcome.last_step(tmp_path) == 1
    result = outcome.write_result(tmp_path, "interrupted", time.monotonic(), signal="SIGTERM")
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert result["status"] == "interrupted" and result["last_step"] == 1
    # The controller's result (the run finished as it was stopped) is kept.
    assert outcome.write_result(tmp_path, "failed", time.monotonic()) == result


def test_which_errors_a_retry_would_meet_again():
    assert is_deterministic(ConfigError("bad key"), started=True)
    assert is_deterministic(FileNotFoundError("words.txt"), started=False)
    assert not is_deterministic(FileNotFoundError("words.txt"), started=True)
    assert not is_deterministic(RuntimeError("CUDA out of memory"), started=False)
    assert not is_deterministic(ConnectionError("redis"), started=False)
    # The script's code raising, a bad sample, a non-finite value: at any time.
    assert is_deterministic(DatasetScriptError("reward fn raised on sample 7"), started=True)
    assert is_deterministic(NonFiniteError("grad norm nan"), started=True)
    restart = ControllerRestarts(most=3)
    assert not restart("controller", EXIT_BAD_INPUT)  # a controller with bad input stays down
    assert restart("controller", 1)


def test_the_first_recorded_fatal_error_wins(tmp_path):
    from gantry.run.runtime import RunInfo

    info = RunInfo(run_id="r", run_dir=str(tmp_path), redis_url="", dataset_script="",
                   dataset_size=1, model_path="")  # fmt: skip
    record_fatal(info, "rollout0", "DatasetScriptError: words.txt missing")
    record_fatal(info, "policy0", "RuntimeError: its consequence")
    fatal = json.loads((tmp_path / FATAL_FILE).read_text())
    assert fatal == {"process": "rollout0", "error": "DatasetScriptError: words.txt missing"}


def test_a_stop_signal_raises_once_and_waits_while_deferred():
    signals = StopSignals()
    previous = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    signals.install()
    try:
        # Raised after the deferred block, not inside it.
        with pytest.raises(KeyboardInterrupt) as caught, signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # handled here, and held back
            stopped_cleanly = True
        assert stopped_cleanly and caught.value.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: ignored
        time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# A stand-in for a role's __main__: follows the launcher named in its environment, starts a
# process in a session of its own (as torchrun does), says its pid, then works forever.
FOLLOWER = textwrap.dedent(
    """
    import subprocess, sys, time
    from gantry.launch.lifeline import watch_launcher
    watch_launcher()
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True)
    print(g.pid, flush=True)
    time.sleep(120)
    """
)


def test_a_process_and_what_it_started_die_with_its_launcher(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    identity = f"{launcher.pid}:{lifeline.start_time(launcher.pid)}"
    follower = subprocess.Popen(
        [sys.executable, "-c", FOLLOWER], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, **{lifeline.LAUNCHER_ENV: identity}), start_new_session=True,
    )  # fmt: skip
    try:
        pid = int(follower.stdout.readline())
        grandchild = (pid, lifeline.start_time(pid))
        assert lifeline.is_alive(grandchild) and follower.poll() is None
        launcher.kill()  # a zombie until reaped: already gone for the follower
        killed = time.monotonic()
        assert follower.wait(timeout=10) == -signal.SIGKILL
        while lifeline.is_alive(grandchild) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        assert not lifeline.is_alive(grandchild)
        assert time.monotonic() - killed < 5
    finally:
        launcher.kill()
        launcher.wait()
        follower.kill()


def test_a_run_s_redis_server_dies_with_its_launcher(tmp_path):
    code = textwrap.dedent(
        f"""
        import time
        from gantry.launch.redis_server import RedisServer
        server = RedisServer({str(tmp_path)!r}, die_with_parent=True)
        server.start()
        print(server.process.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        pid = int(parent.stdout.readline())
        server = (pid, lifeline.start_time(pid))
        assert "redis-server" in Path(f"/proc/{pid}/cmdline").read_text()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while lifeline.is_alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lifeline.is_alive(server)
    finally:
        parent.kill()
