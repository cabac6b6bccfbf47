"""The launcher owns its process tree, on the real launcher and the quickstart (shortened):
Ctrl-C on a terminal and SIGTERM stop the run with one line, result.json `interrupted` with
the last step, exit 130, and no process of the run left; a SIGKILLed launcher takes every
process with it (redis-server too) within seconds; an error a retry would meet again is not
retried (exit 2, one attempt). On a terminal a progress bar shows step / total; elsewhere
there is none, and no vLLM/torch noise or traceback reaches the console."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

from gantry.launch import lifeline

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py"]
# Small steps (8 prompts x 8 samples), 50 of them: the run is stopped long before its end.
LONG = [
    "rollout.backend=transformers", "logging.log_interval=1", "custom.size=400",
    "train.train_batch_per_replica=64", "rollout.n_generation=8", "train.train_policy.mini_batch=64",
]  # fmt: skip
BAR = "━"  # rich's bar
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Launcher:
    """The launcher on the quickstart, its output read by a thread; on a pseudo-terminal (its
    controlling terminal, as in a shell) when `tty`."""

    def __init__(self, tmp_path: Path, *args: str, tty: bool = False) -> None:
        command = [sys.executable, "-m", "gantry.launch", *args, f"train.output_dir={tmp_path}"]
        self.chunks: list[str] = []
        env = dict(os.environ, TERM="xterm-256color")
        if tty:
            self.master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
            # A session of its own whose controlling terminal is the pty: Ctrl-C typed there
            # reaches its foreground process group, as in a shell.
            take_tty = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
            take_tty += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
            self.process = subprocess.Popen(
                [sys.executable, "-c", take_tty, *command[1:]],
                stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                start_new_session=True,
            )  # fmt: skip
            os.close(slave)
            self.reader = threading.Thread(target=self._read_pty, daemon=True)
        else:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                env=env, start_new_session=True,
            )  # fmt: skip
            self.reader = threading.Thread(target=self._read_pipe, daemon=True)
        self.reader.start()

    def _read_pty(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the terminal closed: every writer is gone
                return
            if not data:
                return
            self.chunks.append(data.decode(errors="replace"))

    def _read_pipe(self) -> None:
        for line in self.process.stdout:
            self.chunks.append(line)

    def output(self) -> str:
        """What it wrote, terminal escapes (colours, cursor moves) removed."""
        return ANSI.sub("", "".join(self.chunks))

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            assert self.process.poll() is None, f"the launcher exited:\n{self.output()[-6000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.output()[-6000:]}")

    def run_dir(self) -> Path:
        return Path(self.wait_for(r"run directory: (\S+)", 120).group(1))

    def tree(self) -> list[lifeline.Ident]:
        return lifeline.descendants(self.process.pid)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """The launcher and, should the test have failed before they went, its processes."""
        tree = self.tree()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        lifeline.kill_tree(tree)


def wait_gone(tree: list[lifeline.Ident], timeout: float) -> list[lifeline.Ident]:
    """The processes of `tree` still alive after `timeout` seconds (none, hopefully)."""
    deadline = time.monotonic() + timeout
    while (alive := [i for i in tree if lifeline.is_alive(i)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def commands(tree: list[lifeline.Ident]) -> list[str]:
    names = []
    for pid, _ in tree:
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            names.append(f"pid {pid} (gone)")
    return names


def check_interrupted(launcher: Launcher, run_dir: Path, tree, signame: str) -> None:
    assert launcher.finish(timeout=120) == 130, launcher.output()[-6000:]
    assert not wait_gone(tree, 5), commands(wait_gone(tree, 0))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["signal"] == signame, result
    assert result["last_step"] >= 2, result
    output = launcher.output()
    assert f"interrupted ({signame}): stopping the run" in output
    assert f"stopped at step {result['last_step']}" in output
    assert "Traceback" not in output, output[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_on_a_terminal_stops_the_run_and_the_bar_shows_step_of_total(tmp_path):
    launcher = Launcher(tmp_path, *QUICKSTART, *LONG, tty=True)
    try:
        run_dir = launcher.run_dir()
        launcher.wait_for(r"step 2/50", 300)
        launcher.wait_for(r"━[━╸╺ ]* +[2-9]/50 reward \d", 30)  # the bar, from metrics.jsonl
        tree = launcher.tree()
        assert len(tree) >= 4, commands(tree)  # redis-server, controller, torchrun, rank, rollout
        os.write(launcher.master, b"\x03")  # Ctrl-C, typed
        check_interrupted(launcher, run_dir, tree, "SIGINT")
        assert BAR in launcher.output() and "ETA" in launcher.output()
    finally:
        launcher.kill()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_stops_the_run_like_ctrl_c_and_the_console_holds_gantry_lines_only(tmp_path):
    launcher = Launcher(tmp_path, *QUICKSTART, *LONG)
    try:
        run_dir = launcher.run_dir()
        launcher.wait_for(r"step 2/50", 300)
        tree = launcher.tree()
        launcher.process.send_signal(signal.SIGTERM)  # what scancel, docker stop, systemd send
        check_interrupted(launcher, run_dir, tree, "SIGTERM")
    finally:
        launcher.kill()
    output = launcher.output()
    assert BAR not in output  # not a terminal: plain lines
    # torchrun's traceback on SIGTERM is in the policy's log, not on the console.
    assert "Traceback" in (run_dir / "logs" / "policy0.log").read_text()
    # Only Gantry's lines from the processes; the rest is in their logs.
    for line in output.splitlines():
        if line.startswith("[") and not line.startswith("[launcher]"):
            assert re.match(r"\[\w+ *\] \d\d:\d\d:\d\d (INFO|WARNING|ERROR) [^\[]", line), line


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_process_dies_with_a_sigkilled_launcher(tmp_path):
    launcher = Launcher(tmp_path, *QUICKSTART, *LONG)
    try:
        launcher.wait_for(r"step 1/50", 300)
        tree = launcher.tree()
        names = " ".join(commands(tree))
        assert "redis-server" in names and "gantry.launch.policy_job" in names, names
        assert "-m controller" in names and "-m rollout" in names, names
        os.kill(launcher.process.pid, signal.SIGKILL)  # no handler runs: nobody cleans up
        killed = time.monotonic()
        left = wait_gone(tree, 15)
        assert not left, commands(left)
        assert time.monotonic() - killed < 10
    finally:
        launcher.kill()


# A file only the reward needs is missing: the rollout replicas fail at start, and would on
# every retry. (sys.argv[0] tells the rollout processes from the launcher's check.)
MISSING_FILE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    def get_dataset(config):
        return [{"prompt": f"say {i}", "answer": str(i % 10)} for i in range(512)]

    def exact(completion, sample, **kw):
        return float(completion.strip() == sample["answer"])

    reward_fns = [exact]
    if sys.argv[0].endswith("__main__.py") and Path(sys.argv[0]).parent.name == "rollout":
        WORDS = Path("/nonexistent/gantry-test/words.txt").read_text()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_error_a_retry_would_meet_again_ends_the_run_at_once(tmp_path):
    script = tmp_path / "words.py"
    script.write_text(MISSING_FILE)
    out = tmp_path / "out"
    launcher = Launcher(
        out, "--config", "configs/quickstart-grpo.toml", str(script), *LONG,
        "fault_tolerance.max_restarts=2",
    )  # fmt: skip
    try:
        run_dir = launcher.run_dir()
        assert launcher.finish(timeout=240) == 2, launcher.output()[-6000:]
    finally:
        launcher.kill()
    output = launcher.output()
    assert "restart 1/2" not in output  # one attempt
    last = output.strip().splitlines()[-1]
    assert last.startswith("[launcher] error: rollout0: ") and "words.txt" in last, output
    assert f"{run_dir}/logs/rollout0.log" in last and "not retried" in last
    assert "Traceback" not in output
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["retried"] is False, result
    assert result["process"] == "rollout0" and "words.txt" in result["error"]
