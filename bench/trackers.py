"""Benchmark: what the trackers (wandb, offline, and TensorBoard) cost the quickstart's step
time, against the same run with the console only, in the same run of this script.

    .venv/bin/python bench/trackers.py [--steps 30] [--rounds 2] [--backend vllm] [--skip 5]
        [--work-dir /tmp/gantry-bench-trackers] [key=value ...]

Each run is the real thing: `python -m gantry.launch --config configs/quickstart-grpo.toml
datasets/arithmetic.py` with `train.max_num_steps=--steps` and the quickstart's own
log_interval (its sample completions included), WANDB_MODE=offline; `logging.logger` is
["console"] (off) or ["console", "wandb", "tensorboard"] (on), alternating within each round so
that both sides meet the same machine load. From each run's metrics.jsonl, over the steps after
the first `--skip` (engine start-up, first syncs): step time = wall-clock seconds between the
step records / steps. Prints each run, the median step time of each side and their ratio
(on / off; target: at most 1.01), and a direct figure less exposed to the machine's noise: the
CPU time the trackers' thread spent in the controller (`cpu_seconds` of trackers.json) per step,
as a fraction of the step time (wandb's own service process is a separate process: the ratio
counts it, this figure does not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml"]
DATASET = "datasets/arithmetic.py"
LOGGERS = {"off": '["console"]', "on": '["console", "wandb", "tensorboard"]'}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="vllm", choices=("transformers", "vllm"))
    parser.add_argument("--skip", type=int, default=5, help="first steps left out")
    parser.add_argument("--work-dir", default="/tmp/gantry-bench-trackers")
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    return parser.parse_args()


def launch(args, side: str, out: Path) -> Path:
    """One run of the launcher; its run directory."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_DIR", None)  # the run directory holds the offline run
    command = [
        sys.executable, *LAUNCH, DATASET, f"train.output_dir={out}",
        f"train.max_num_steps={args.steps}", f"rollout.backend={args.backend}",
        f"logging.logger={LOGGERS[side]}", *args.overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the {side} run failed:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    (run_dir,) = [p for p in out.iterdir() if (p / "run.json").is_file()]
    return run_dir


def figures(run_dir: Path, skip: int) -> dict[str, float]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if not m.get("validation")]
    if len(metrics) <= skip:
        sys.exit(f"{run_dir}: {len(metrics)} steps, not more than --skip {skip}")
    kept = metrics[skip:]
    step_s = (kept[-1]["elapsed_s"] - metrics[skip - 1]["elapsed_s"]) / len(kept)
    state_file = run_dir / "trackers.json"
    cpu = json.loads(state_file.read_text()).get("cpu_seconds") if state_file.exists() else None
    return {
        "step_s": step_s,
        # Over the whole run: the thread's time is not split per step.
        "tracker_cpu_per_step_s": cpu / len(metrics) if cpu is not None else None,
    }


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    started = time.monotonic()
    for round_ in range(args.rounds):
        order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
        for side in order:
            out = work / f"round{round_}-{side}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            found = figures(launch(args, side, out), args.skip)
            runs[side].append(found)
            cpu = found["tracker_cpu_per_step_s"]
            print(
                f"round {round_} {side:>3}: {found['step_s']:.3f} s/step"
                + (f", trackers' thread {cpu * 1000:.2f} ms CPU/step" if cpu is not None else ""),
                flush=True,
            )
    off = statistics.median(r["step_s"] for r in runs["off"])
    on = statistics.median(r["step_s"] for r in runs["on"])
    cpu = statistics.median(r["tracker_cpu_per_step_s"] for r in runs["on"])
    print(
        f"\nquickstart ({args.backend}, {args.steps} steps, first {args.skip} left out, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - started:.0f}s):\n"
        f"  trackers off: {off:.3f} s/step   on: {on:.3f} s/step   ratio on/off: {on / off:.3f}\n"
        f"  trackers' thread in the controller: {cpu * 1000:.2f} ms CPU per step = "
        f"{cpu / on:.2%} of a step (target: at most 1%)"
    )


if __name__ == "__main__":
    main()
