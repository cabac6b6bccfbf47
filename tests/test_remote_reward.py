"""The remote reward (train.train_policy.reward_server): a real HTTP server on 127.0.0.1 started
by the test scores completions, retries cover a server that hiccups, and a server that is down
stops the run with one line naming its URL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gantry.data.remote_reward import RemoteReward, RemoteRewardError
from gantry.launch.redis_server import free_port
from tests.test_interrupt import LONG, QUICKSTART, Launcher, commands, wait_gone

ROOT = Path(__file__).resolve().parents[1]


class Scorer:
    """A scorer over HTTP: 1.0 for a completion holding the sample's answer; `fail_first`
    requests answered 503 first (a server that hiccups)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[dict] = []
        self.fail_first = fail_first
        scorer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scorer.requests.append(body)
                if len(scorer.requests) <= scorer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                answer = str(body["sample"].get("answer", ""))
                rewards = [float(answer in c) for c in body["completions"]]
                infos = [{"judge_chars": len(c)} for c in body["completions"]]
                data = json.dumps({"rewards": rewards, "infos": infos}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scorer():
    server = Scorer()
    yield server
    server.stop()


def test_the_server_scores_a_group_in_one_request(scorer):
    rewards, infos = RemoteReward(scorer.url, timeout=5, retries=0)(
        ["x 7", "8"], {"answer": 7}, "0:3"
    )
    assert rewards == [1.0, 0.0] and infos == [{"judge_chars": 3}, {"judge_chars": 1}]
    assert scorer.requests == [
        {"completions": ["x 7", "8"], "sample": {"answer": 7}, "prompt_id": "0:3"}
    ]


def test_a_server_that_hiccups_is_retried():
    server = Scorer(fail_first=2)
    try:
        rewards, _ = RemoteReward(server.url, timeout=5, retries=2)(["1"], {"answer": 1})
    finally:
        server.stop()
    assert rewards == [1.0] and len(server.requests) == 3


def test_a_server_that_is_down_is_one_line_naming_its_url():
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    with pytest.raises(RemoteRewardError) as excinfo:
        RemoteReward(url, timeout=1, retries=1)(["1"], {"answer": 1})
    message = str(excinfo.value)
    assert message.startswith(f"reward server {url} is unreachable after 1 retries")
    assert "reward_server.url" in message and "\n" not in message


SMALL = [
    "rollout.backend=transformers", "custom.size=64", "train.train_batch_per_replica=32",
    "rollout.n_generation=4", "train.train_policy.mini_batch=32", "logging.log_interval=1",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_is_scored_by_the_remote_server_with_weights_and_infos(tmp_path, scorer):
    config = tmp_path / "rl.toml"  # the weights as users write them: a TOML table
    config.write_text(
        (ROOT / QUICKSTART[1])
        .read_text()
        .replace(
            "[train.train_policy]\n",
            "[train.train_policy]\n"
            "reward_function = {correct_reward = 1.0, format_reward = 0.0, judge = 0.5}\n",
        )
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "gantry.launch", "--config", str(config), QUICKSTART[2],
         f"train.output_dir={out}", *SMALL, "train.max_num_steps=3",
         f"train.train_policy.reward_server.url={scorer.url}",
         "train.train_policy.reward_server.name=judge"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert len(scorer.requests) >= 3 * 8  # one request per group (8 prompts a step)
    for m in metrics:  # the weighted sum of the unweighted parts
        expected = m["reward/correct_reward"] + 0.5 * m["reward/judge"]
        assert m["reward_mean"] == pytest.approx(expected, abs=1e-9)
        assert m["reward_info/judge_chars"] > 0
    rows = [r for line in (run_dir / "samples.jsonl").open() for r in json.loads(line)["samples"]]
    assert rows and all(r["reward_info/judge_chars"] == len(r["completion"]) for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_reward_server_that_goes_down_stops_the_run_with_one_line(tmp_path):
    server = Scorer()
    launcher = Launcher(
        tmp_path / "out", *QUICKSTART, *LONG, "fault_tolerance.max_restarts=2",
        f"train.train_policy.reward_server.url={server.url}",
        "train.train_policy.reward_server.retries=1", "train.train_policy.reward_server.timeout=2",
    )  # fmt: skip
    try:
        launcher.run_dir()
        launcher.wait_for(r"step 2/", 200)
        tree = launcher.tree()
        server.stop()
        assert launcher.finish(timeout=120) == 2, launcher.output()[-6000:]
        assert not wait_gone(tree, 10), commands(wait_gone(tree, 0))
    finally:
        server.stop() if server.thread.is_alive() else None
        launcher.kill()
    output = launcher.output()
    last = output.strip().splitlines()[-1]
    assert f"reward server {server.url} is unreachable after 1 retries" in last, output[-4000:]
    assert "Traceback" not in output and "restart 1/2" not in output
