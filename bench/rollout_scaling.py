"""Benchmark: GRPO step time and the policy's idle fraction with 1 vs 2 rollout replicas, and the
time a replica started mid-run takes to receive the weights and return its first result.

    .venv/bin/python bench/rollout_scaling.py [--steps 16] [--rounds 2] [--backend transformers]
        [--replicas 1,2] [--skip 3] [--work-dir /tmp/gantry-bench-scaling] [key=value ...]

Each run is the real thing: `python -m gantry.launch --config configs/quickstart-grpo.toml
datasets/arithmetic.py` (controller, one policy replica, N rollout replicas, embedded Redis),
`train.max_num_steps=--steps`, logging every step, the extra `key=value` overrides last. The
replica counts alternate within each round so that both meet the same machine load. From the
run's metrics.jsonl, over the steps after the first `--skip` (engine start-up and the first
syncs): step time = wall-clock seconds between step records / steps; the policy's busy time =
the sum of its `policy_seconds` (inside `trainer.step`); idle fraction = 1 - busy / wall: the
share of the time the policy waits for rollouts (and weight syncs). Goal: the idle fraction
falls as replicas are added. On a CPU machine the launcher splits the cores among the rollout
replicas (gantry.launch.nodes.with_cpu_shares) and the policy shares them; the CPU count is printed.
--no-joiner leaves the late-replica run out.

Then one more run with one replica: after step `--skip`, the bench starts `python -m rollout
--run-dir RUN --replica 9` and reports, from the controller's record of that replica in
result.json, the seconds from its registration to its first confirmed weights and to its first
result, and, measured here, the seconds from its process start to its registration (seen in the
controller's log; interpreter, model and engine start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml"]
DATASET = "datasets/arithmetic.py"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--skip", type=int, default=3, help="first steps left out")
    parser.add_argument("--joiner-only", action="store_true", help="only the late replica")
    parser.add_argument("--no-joiner", action="store_true", help="leave the late replica out")
    parser.add_argument("--work-dir", default="/tmp/gantry-bench-scaling")
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    return parser.parse_args()


def overrides(args, replicas: int, out: Path) -> list[str]:
    return [
        DATASET, f"train.output_dir={out}", f"train.max_num_steps={args.steps}",
        f"rollout.backend={args.backend}", f"rollout.parallelism.n_init_replicas={replicas}",
        "logging.log_interval=1", *args.overrides,
    ]  # fmt: skip


def only_run_dir(out: Path) -> Path | None:
    """The run directory the launcher made under `out` (None until it wrote run.json)."""
    found = [p for p in out.iterdir() if (p / "run.json").is_file()]
    return found[0] if len(found) == 1 else None


def step_figures(run_dir: Path, skip: int) -> dict[str, float]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = metrics[skip:]
    wall = kept[-1]["elapsed_s"] - metrics[skip - 1]["elapsed_s"]
    busy = sum(m["policy_seconds"] for m in kept)
    return {
        "step_s": wall / len(kept),
        "idle": 1.0 - busy / wall,
        "samples_per_s": sum(m["samples_per_s"] for m in kept) / len(kept),
        "reward_last": kept[-1]["reward_mean"],
    }


def one_run(args, replicas: int, out: Path) -> dict[str, float]:
    command = [sys.executable, *LAUNCH, *overrides(args, replicas, out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"run failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return step_figures(only_run_dir(out), args.skip)


def joiner_run(args, out: Path) -> dict[str, float]:
    """One replica; a second one started after step --skip: its time to weights and results."""
    command = [sys.executable, *LAUNCH, *overrides(args, 1, out)]
    launcher = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    joiner = None
    try:
        run_dir = _wait_for(lambda: only_run_dir(out), 120)
        log = run_dir / "logs" / "controller.log"
        _wait_for(lambda: re.search(rf"step {args.skip}/", _read(log)), 900)
        started = time.monotonic()
        joiner = subprocess.Popen(
            [sys.executable, "-m", "rollout", "--run-dir", str(run_dir), "--replica", "9"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for(lambda: "rollout replica 9 registered" in _read(log), 600, poll=0.05)
        registered = time.monotonic() - started
        if launcher.wait(timeout=1800):
            raise SystemExit(f"run failed: {launcher.stderr.read().decode()[-4000:]}")
        joiner.wait(timeout=120)
    finally:
        for process in (launcher, joiner):
            if process is not None and process.poll() is None:
                process.kill()
    late = json.loads((run_dir / "result.json").read_text())["rollout_replicas"]["9"]
    return {
        "start_to_register_s": registered,
        "register_to_weights_s": late["weights_after_s"],
        "register_to_first_result_s": late["first_result_after_s"],
        "groups": late["groups"],
    }


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:.0f}s")


def compare(args, counts: list[int], work: Path) -> None:
    """The runs with each replica count, alternating, and their medians."""
    figures: dict[int, list[dict]] = {c: [] for c in counts}
    for r in range(args.rounds):
        for count in counts if r % 2 == 0 else counts[::-1]:
            out = work / f"round{r}-replicas{count}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            figures[count].append(one_run(args, count, out))
            print(f"round {r}, {count} replica(s): {figures[count][-1]}", flush=True)
    print(
        f"\n== GRPO quickstart, {args.backend} engine, {args.steps} steps (first {args.skip} "
        f"left out), {args.rounds} round(s), {os.cpu_count()} CPUs"
    )
    idle = {}
    for count in counts:
        runs = figures[count]
        idle[count] = statistics.median(f["idle"] for f in runs)
        print(
            f"  {count} rollout replica(s): step {statistics.median(f['step_s'] for f in runs):.3f} s"
            f", policy idle {idle[count]:.1%}, "
            f"{statistics.median(f['samples_per_s'] for f in runs):.1f} samples/s"
        )
    falls = all(idle[a] > idle[b] for a, b in zip(counts, counts[1:], strict=False))
    print(f"  idle fraction falls as replicas are added: {'YES' if falls else 'NO'}")


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    if not args.joiner_only:
        compare(args, [int(c) for c in args.replicas.split(",")], work)
    if args.no_joiner:
        return
    out = work / "joiner"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    late = joiner_run(args, out)
    print(
        f"  a replica started after step {args.skip}: registered {late['start_to_register_s']:.2f}"
        f" s after its start, weights {late['register_to_weights_s']} s and first result "
        f"{late['register_to_first_result_s']} s after registering ({late['groups']} groups)"
    )


if __name__ == "__main__":
    main()
