"""Benchmark: the control plane's own cost in one short quickstart run.

    .venv/bin/python bench/control_plane.py [--steps 12] [--backend vllm] [override ...]

Runs `python -m gantry.launch --config configs/quickstart-grpo.toml datasets/arithmetic.py`
for --steps steps (logging every step) and reads its metrics.jsonl. Prints, over the steps
after the first (start-up), the medians and worst of:
  weight_sync_wait_s      the policy's wait for the rollout replicas to check in to a sync;
  sync_order_latency_ms   a replica's time from the sync order to starting on it;
  control_latency_p50/p99 send-to-handling latency of the controller's and policy's messages;
  controller_cpu_s        the controller process's CPU seconds per step;
and the length of a generate call (a replica takes an order once the call in flight ends);
each latency also as a fraction of the 200 ms the rollout loop used to block on its prompt
stream before it looked for commands (the loop before the event-driven control plane; the
measured check-in wait then was 0.17-0.32 s). The replica's wait includes finishing a generate
call in flight, which no control plane can shorten.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart-grpo.toml"
DATASET = ROOT / "datasets" / "arithmetic.py"
OLD_BLOCK_MS = 200.0  # the rollout loop's former block on prompts before it read commands


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    return parser.parse_args()


def run(args, out: Path) -> tuple[list[dict], int]:
    command = [
        sys.executable, "-m", "gantry.launch", "--config", str(CONFIG), str(DATASET),
        f"train.output_dir={out}", f"train.max_num_steps={args.steps}",
        f"rollout.backend={args.backend}", "logging.log_interval=1", *args.overrides,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"run: {args.steps} steps in {time.monotonic() - started:.1f}s ({args.backend})")
    run_dir = next(p for p in out.iterdir() if (p / "run.json").is_file())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    batch = json.loads((run_dir / "config.json").read_text())["rollout"]["batch_size"]
    return [json.loads(line) for line in lines], batch


def line(name: str, values: list[float], unit: str, per_ms: float) -> str:
    median, worst = statistics.median(values), max(values)
    return (
        f"{name:<24} median {median:9.3f} {unit:<2}  max {worst:9.3f} {unit:<2}  "
        f"median / {OLD_BLOCK_MS:.0f} ms = {median * per_ms / OLD_BLOCK_MS:.3f}"
    )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="gantry-control-") as work:
        records, batch = run(args, Path(work))
    steady = records[1:] or records
    synced = [r for r in steady if r.get("sync_order_latency_ms", 0.0) > 0] or steady
    print(line("weight_sync_wait_s", [r["weight_sync_wait_s"] for r in synced], "s", 1000.0))
    print(line("sync_order_latency_ms", [r["sync_order_latency_ms"] for r in synced], "ms", 1.0))
    # A replica takes the order once its generate call in flight ends: the call's length.
    calls = [r["generation_seconds"] * batch / len(r["prompt_ids"]) for r in steady]
    print(line("generate call (s)", calls, "s", 1000.0) + "  (the inherent part)")
    for key in ("control_latency_p50_ms", "control_latency_p99_ms"):
        print(line(key, [r[key] for r in steady], "ms", 1.0))
    cpu = [r["controller_cpu_s"] for r in steady]
    print(f"{'controller_cpu_s':<24} median {statistics.median(cpu):9.3f} s   per step")


if __name__ == "__main__":
    main()
