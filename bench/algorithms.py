"""Benchmark: the GRPO loss variants on the quickstart task, same steps and seed, in one run.

    .venv/bin/python bench/algorithms.py [--steps 20] [--rounds 1] [--skip 3]
        [--backend vllm] [--only grpo,decoupled-tis] [--work-dir /tmp/gantry-bench-algorithms]
        [key=value ...]

Each run is the real thing: `python -m gantry.launch --config configs/quickstart-grpo.toml
datasets/arithmetic.py` with `train.max_num_steps=--steps`, logging every step, and the
variant's keys of `[train.train_policy]` (docs/algorithms.md, docs/rewards.md). The variants
alternate within each round (reversed every other round) so that all meet the same machine
load. From each run's metrics.jsonl: the reward at the end (mean of the last 5 steps'
`reward_mean`), the policy's time per step (mean `policy_seconds` after the first `--skip`
steps: the forward, backward and optimizer step, where a loss variant costs), the wall-clock
seconds per step, and the mean engine-policy log-prob gap; for the decoupled loss, the mean
behaviour importance weight and the fraction of tokens it capped; for DAPO, the groups drawn
per step. The last lines give each variant's policy time against the baseline's (`grpo`) in
the same round: the off-policy correction must cost at most 5% of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["-m", "gantry.launch", "--config", "configs/quickstart-grpo.toml"]
DATASET = "datasets/arithmetic.py"
TP = "train.train_policy."
# The quickstart's max_response_length (4): Dr.GRPO's constant normaliser.
VARIANTS: dict[str, list[str]] = {
    "grpo": [],
    "decoupled-tis": [
        f"{TP}use_decoupled_loss=true", f"{TP}behav_imp_weight_mode=truncate",
        f"{TP}behav_imp_weight_cap=2.0",
    ],
    "decoupled-mask-seq": [
        f"{TP}use_decoupled_loss=true", f"{TP}behav_imp_weight_level=sequence",
        f"{TP}behav_imp_weight_cap=2.0",
    ],
    "seq-mean-token-mean": [f"{TP}loss_type=seq-mean-token-mean"],
    "dr-grpo": [
        f"{TP}loss_type=seq-mean-token-mean", f"{TP}unbiased_loss_max_tokens=4",
        f"{TP}unbiased_advantage=true",
    ],
    "gspo": [f"{TP}variant=gspo"],
    "dapo": [f"{TP}variant=dapo", f"{TP}overlong_reward.enable_overlong_penalty=true",
             f"{TP}overlong_reward.buffer_length=2"],
    "entropy": [f"{TP}entropy_coeff=0.001"],
}  # fmt: skip
BASELINE = "grpo"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of times")
    parser.add_argument("--backend", default="vllm", choices=("transformers", "vllm"))
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--work-dir", default="/tmp/gantry-bench-algorithms")
    parser.add_argument("overrides", nargs="*", help="more config overrides, for every run")
    return parser.parse_args()


def run_variant(args, name: str, out: Path) -> dict[str, float]:
    command = [
        sys.executable, *LAUNCH, DATASET, f"train.output_dir={out}",
        f"train.max_num_steps={args.steps}", f"rollout.backend={args.backend}",
        "logging.log_interval=1", *VARIANTS[name], *args.overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (run_dir,) = [p for p in out.iterdir() if (p / "metrics.jsonl").is_file()]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return figures([json.loads(line) for line in lines], args.skip)


def figures(metrics: list[dict], skip: int) -> dict[str, float]:
    kept = metrics[skip:]
    mean = lambda key: statistics.fmean(m.get(key, 0.0) for m in kept)  # noqa: E731
    wall = (kept[-1]["elapsed_s"] - metrics[skip - 1]["elapsed_s"]) / len(kept)
    return {
        "reward_end": statistics.fmean(m["reward_mean"] for m in metrics[-5:]),
        "policy_s": mean("policy_seconds"),
        "wall_s": wall,
        "gap": mean("logprob_gap_mean"),
        "imp_weight": mean("behav_imp_weight_mean"),
        "capped": mean("behav_imp_weight_capped_fraction"),
        "drawn": mean("dapo_groups_drawn"),
    }


def table(results: dict[str, list[dict]], args) -> None:
    print(
        f"\n== quickstart GRPO, {args.backend} engine, {args.steps} steps (times after step "
        f"{args.skip}), {args.rounds} round(s), {os.cpu_count()} CPUs; medians"
    )
    print("| variant | reward (last 5) | policy s/step | wall s/step | log-prob gap | "
          "imp. weight | capped | groups drawn |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {name} | {med['reward_end']:.3f} | {med['policy_s']:.3f} | {med['wall_s']:.3f} "
            f"| {med['gap']:.2e} | {med['imp_weight']:.3f} | {med['capped']:.3f} "
            f"| {med['drawn']:.1f} |"
        )
    if BASELINE not in results:
        return
    for name, runs in results.items():
        if name == BASELINE:
            continue
        ratios = [
            r["policy_s"] / b["policy_s"] for r, b in zip(runs, results[BASELINE], strict=True)
        ]
        print(f"  {name}: policy time {statistics.median(ratios):.3f}x {BASELINE}'s (paired)")


def main() -> None:
    args = parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    work = Path(args.work_dir)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            out = work / f"round{round_}-{name}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            results[name].append(run_variant(args, name, out))
            print(f"round {round_}, {name}: {results[name][-1]}", flush=True)
    table(results, args)


if __name__ == "__main__":
    main()
