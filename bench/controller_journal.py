"""Benchmark: what the controller's journal (controller/journal.py) costs a pass of its loop,
against the same writes sent the way they were before the journal, in the same run.

    .venv/bin/python bench/controller_journal.py [--replicas 8] [--in-flight 64]
        [--dataset 1000000] [--steps 2000] [--passes 2000]

A real `Controller` on a real embedded redis-server (loopback), its state filled as in a large
run: --replicas rollout replicas with --in-flight prompts each, a buffer of one batch of
results, --steps steps of history (rewards), a --dataset-prompt queue halfway through an epoch.
A pass hands 8 prompts to a replica and acknowledges 8 results, as a busy pass does. Sides:
  baseline  the writes alone: one MULTI/EXEC for the 8 prompts (`send_many`), one XACK;
  journal   the same writes through the `Outbox`, committed with the controller's snapshot
            (`Controller._commit`: the state's JSON, `controller.state`, one MULTI/EXEC).
Sides alternate in rounds of 100 passes; prints the median pass time of each, their ratio,
and the snapshot's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.controller import GROUP, Controller  # noqa: E402
from gantry.comm.protocol import PromptTask, RolloutGroup, Sample  # noqa: E402
from gantry.config import load_config  # noqa: E402
from gantry.launch.redis_server import RedisServer  # noqa: E402
from gantry.run.runtime import RunInfo  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--dataset", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=2000)
    return parser.parse_args()


def busy_controller(args, url: str, run_dir: Path) -> Controller:
    config = load_config(ROOT / "configs/quickstart-grpo.toml", ["logging.log_interval=1000"])
    info = RunInfo(
        run_id="bench", run_dir=str(run_dir), redis_url=url, dataset_script="",
        dataset_size=args.dataset, model_path="",
    )  # fmt: skip
    controller = Controller(config, info)
    run, fleet, buffer = controller.context, controller.plan.fleet, controller.plan.buffer
    run.plane.ensure_group(run.keys.rollouts, GROUP)
    for _ in range(args.dataset // 2):
        run.queue.next()
    for r in range(args.replicas):
        fleet.register(str(r), 2, holds_version=5, policy_version=5)
        for i in range(args.in_flight):
            fleet.dispatched(str(r), f"0:{r * args.in_flight + i}")
    fleet.plan(sorted(fleet.replicas))
    sample = Sample(token_ids=[1] * 8, logprobs=[-1.0] * 8, reward=1.0, finish_reason="stop")
    for i in range(run.groups_per_step):
        group = RolloutGroup(
            prompt_id=f"0:{10**6 + i}", replica="0", policy_version=5,
            prompt_token_ids=[1], samples=[sample],
        )  # fmt: skip
        buffer.add(group, f"{i + 1}-0", version=5)
    run.state.rewards = [0.1] * args.steps
    run.state.version = run.state.steps_sent = args.steps
    return controller


def one_pass(controller: Controller, journal: bool, n: int) -> float:
    tasks = [PromptTask(prompt_id=f"1:{n * 8 + i}", epoch=1, index=i) for i in range(8)]
    entries = [f"{n + 1}-{i}" for i in range(8)]
    run = controller.context
    stream, keys = run.keys.prompts("0"), run.keys
    started = time.perf_counter()
    if journal:
        run.out.send_many(stream, tasks)
        run.out.ack(keys.rollouts, GROUP, entries)
        controller._commit()
    else:
        run.plane.send_many(stream, tasks)
        run.plane.ack(keys.rollouts, GROUP, entries)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        controller = busy_controller(args, server.url, Path(tmp))
        snapshot = json.dumps(controller._snapshot())
        times = {False: [], True: []}
        for n in range(args.passes):
            journal = (n // 100) % 2 == 1
            times[journal].append(one_pass(controller, journal, n))
            if n % 500 == 0:  # keep the prompt stream from growing without end
                controller.context.plane.redis.delete(controller.context.keys.prompts("0"))
    base, ours = (statistics.median(times[k]) * 1e3 for k in (False, True))
    print(
        f"state: {args.replicas} replicas x {args.in_flight} prompts in flight, "
        f"{args.dataset} prompts in the dataset, {args.steps} steps done"
    )
    print(f"snapshot: {len(snapshot) / 1024:.1f} KiB")
    print(f"pass, baseline (writes alone): {base:.3f} ms")
    print(f"pass, journal (writes + snapshot, one transaction): {ours:.3f} ms")
    print(f"ratio journal / baseline: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
