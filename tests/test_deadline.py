"""gantry.run.deadline: work past its deadline is named and its process exits; work within it
is not disturbed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from gantry.run.deadline import Watchdog

    watchdog = Watchdog(on_expiry=lambda text: print("expired:", text, flush=True))
    for _ in range(20):  # many short calls, each well within its limit
        with watchdog.limit(0.5, lambda: "quick"):
            time.sleep(0.01)
    with watchdog.limit(0, lambda: "unlimited"):
        time.sleep(0.7)
    time.sleep(0.7)  # outside any limit
    print("quick ones done", flush=True)
    if sys.argv[1] == "hang":
        with watchdog.limit(0.5, lambda: "reward function f on sample 7"):
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
        assert lines[1] == "expired: reward function f on sample 7 did not return within 0.5 s"
        assert time.monotonic() - started < 20  # not the 60 s the call would have taken
