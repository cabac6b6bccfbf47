"""Benchmark: Gantry's GRPO against TRL's GRPOTrainer on the quickstart task, side by side.

    .venv/bin/python bench/vs_trl.py [--rounds 3] [--steps 30] [--backend vllm]
        [--trl-env /tmp/gantry-bench-trl] [--work-dir /tmp/gantry-bench-vs-trl] [key=value ...]

TRL is never a dependency of Gantry: the bench makes its own virtual environment first,
`bench/vs_trl_env.sh DIR TORCH TRANSFORMERS [TRL]` (DIR/venv: the torch and transformers
versions of the running interpreter, trl 1.16.0 by default (--trl-version), trl's own
dependencies; once, then reused), so it needs a package index on its first run. By hand:

    bench/vs_trl_env.sh /tmp/gantry-bench-trl 2.13.0 5.19.0 1.16.0

Both sides train the same local model directory (the quickstart's `gantry:tiny-qwen2`, built
once by the launcher's own builder, gantry.models.tiny.BUILTIN_MODELS, under --work-dir) on the
quickstart task (datasets/arithmetic.py: its prompts, and its reward functions summed, which
TRL calls as reward funcs), with the quickstart's settings: 32 prompts x 16 completions per
step, 4-token completions, --steps steps, learning rate 1e-3 (constant, AdamW, no weight
decay), gradient clip 1.0, temperature 1.0, top_p 1.0, no KL term, clip 0.2, token-mean loss
(TRL: loss_type "dapo"), float32, seed 42. The prompt token ids are the same: the TRL side
checks that TRL's chat-template tokenization gives the ids Gantry's rollout sends (chat
template as text, then tokens without special tokens). TRL generates with the model itself
(no vLLM); Gantry runs `python -m gantry.launch --config configs/quickstart-grpo.toml
datasets/arithmetic.py` (controller, policy, rollout with --backend, embedded Redis). Both
write the final model (Gantry's export, TRL's save_model).

Each round runs Gantry async (the quickstart: allowed_outdated_steps = 1), TRL, and Gantry
sync (allowed_outdated_steps = 0), in an order that alternates between rounds. Per run:
wall time from process start to exit, completions/s = steps x 512 / wall, CPU seconds of the
whole process tree (getrusage(RUSAGE_CHILDREN) before and after: every process its parent
waited for), and the steady step time (median step after the first --skip). Printed: each
round, the medians, and the ratios Gantry/TRL and async/sync, per round and their medians.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart-grpo.toml"
DATASET = ROOT / "datasets" / "arithmetic.py"
PROMPTS, SAMPLES = 32, 16  # per step, as in the quickstart
TASK = {"size": 5000, "max_operand": 4, "seed": 0}  # the quickstart's [custom] section
RESULT_TAG = "VS_TRL_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of step time")
    parser.add_argument("--backend", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument("--sides", default="async,trl,sync", help="which runs, in round 0's order")
    parser.add_argument("--trl-env", default="/tmp/gantry-bench-trl", help="TRL's venv parent")
    parser.add_argument("--trl-version", default="1.16.0")
    parser.add_argument("--work-dir", default="/tmp/gantry-bench-vs-trl")
    parser.add_argument("--trl-worker", metavar="JSON", help=argparse.SUPPRESS)  # internal
    parser.add_argument("overrides", nargs="*", help="more config overrides (Gantry side)")
    return parser.parse_args(argv)


# ---- the TRL side: runs inside the TRL venv, imports nothing from Gantry ------------------


def _load_task():
    """datasets/arithmetic.py by path (a plain `import datasets` is Hugging Face's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("arithmetic", DATASET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trl_rewards(task) -> list:
    """The task's reward functions in TRL's calling convention (one list per batch)."""

    def wrap(fn):
        def reward(completions, answer, **kw):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [fn(t, {"answer": a}) for t, a in zip(texts, answer, strict=True)]

        reward.__name__ = fn.__name__
        return reward

    return [wrap(fn) for fn in task.reward_fns]


def _check_prompt_ids(tokenizer, rows: list[dict]) -> None:
    """TRL tokenizes conversational prompts with apply_chat_template(tokenize=True); Gantry's
    rollout renders the template as text and tokenizes that without special tokens."""
    for row in rows:
        text = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=False
        )
        gantry_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        trl_ids = tokenizer.apply_chat_template(
            [row["prompt"]], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        if list(trl_ids) != list(gantry_ids):
            raise SystemExit(f"prompt ids differ for {row['prompt']!r}: {trl_ids} vs {gantry_ids}")


def _trl_config(spec: dict):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=PROMPTS * SAMPLES,
        gradient_accumulation_steps=1, num_generations=SAMPLES, steps_per_generation=1,
        num_iterations=1, max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, seed=42, logging_steps=1,
        save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip


def trl_worker(spec: dict) -> None:
    """One TRL run; prints its figures as one JSON line tagged RESULT_TAG."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    task = _load_task()
    rows = [{"prompt": s["messages"][:-1], "answer": s["answer"]} for s in task.get_dataset(TASK)]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    _check_prompt_ids(tokenizer, rows[:64])
    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.monotonic())

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model, reward_funcs=_trl_rewards(task), args=_trl_config(spec),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[StepClock()],
    )  # fmt: skip
    started = time.monotonic()
    trainer.train()
    trainer.save_model(spec["out"] + "/final")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    steps = [b - a for a, b in zip([started, *stamps], stamps, strict=False)]
    print(
        RESULT_TAG + json.dumps({"steps": steps, "reward_last": rewards[-1] if rewards else None})
    )


# ---- the driver: runs in Gantry's .venv ----------------------------------------------------


def make_trl_env(args) -> Path:
    """TRL's venv (made once), or SystemExit with the one line the env script printed."""
    versions = [importlib.metadata.version(p).split("+")[0] for p in ("torch", "transformers")]
    command = ["bash", str(ROOT / "bench" / "vs_trl_env.sh"), args.trl_env, *versions]
    done = subprocess.run([*command, args.trl_version], capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["vs_trl_env.sh failed"]
        raise SystemExit(lines[-1])
    return Path(args.trl_env) / "venv" / "bin" / "python"


def build_model(work: Path) -> Path:
    """The quickstart's model, built by the launcher's builder into one directory both use."""
    path = work / "model" / "tiny-qwen2"
    code = f"from gantry.models.tiny import BUILTIN_MODELS; BUILTIN_MODELS['gantry:tiny-qwen2']({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return path


def timed(command: list[str], out: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `command`; its wall seconds and the CPU seconds of its whole process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (out / "stdout.log").write_text(done.stdout)
    (out / "stderr.log").write_text(done.stderr)
    if done.returncode:
        raise SystemExit(
            f"run failed (exit {done.returncode}); logs in {out}:\n{done.stderr[-3000:]}"
        )
    return done, wall, cpu


def gantry_run(args, model: Path, sync: bool, out: Path) -> dict:
    command = [
        sys.executable, "-m", "gantry.launch", "--config", CONFIG, str(DATASET),
        f"policy.model_name_or_path={model}", f"train.output_dir={out}",
        f"train.max_num_steps={args.steps}", f"rollout.backend={args.backend}",
        f"train.train_policy.allowed_outdated_steps={0 if sync else 1}",
        "logging.log_interval=1", *args.overrides,
    ]  # fmt: skip
    _, wall, cpu = timed(command, out)
    run_dir = next(p for p in out.iterdir() if (p / "run.json").is_file())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [m["elapsed_s"] for m in metrics]
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return figures(args, wall, cpu, steps[args.skip - 1 :], metrics[-1]["reward_mean"])


def trl_run(args, python: Path, model: Path, out: Path) -> dict:
    spec = {"model": str(model), "steps": args.steps, "out": str(out)}
    command = [str(python), str(Path(__file__).resolve()), "--trl-worker", json.dumps(spec)]
    done, wall, cpu = timed(command, out)
    tagged = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not tagged:
        raise SystemExit(f"the TRL run printed no result; logs in {out}")
    result = json.loads(tagged[-1].removeprefix(RESULT_TAG))
    return figures(args, wall, cpu, result["steps"][args.skip :], result["reward_last"])


def figures(args, wall: float, cpu: float, steady_steps: list[float], reward) -> dict:
    return {
        "wall_s": wall,
        "completions_per_s": args.steps * PROMPTS * SAMPLES / wall,
        "cpu_s": cpu,
        "step_s": statistics.median(steady_steps) if steady_steps else float("nan"),
        "reward_last": reward,
    }


def one_round(args, r: int, sides: list[str], python, model: Path, work: Path) -> dict:
    found = {}
    for side in sides if r % 2 == 0 else sides[::-1]:
        out = work / f"round{r}-{side}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        load = os.getloadavg()[0]
        if side == "trl":
            found[side] = trl_run(args, python, model, out)
        else:
            found[side] = gantry_run(args, model, side == "sync", out)
        found[side]["load_before"] = load
        f = found[side]
        print(
            f"round {r} {side:5s}: {f['completions_per_s']:6.1f} completions/s, wall "
            f"{f['wall_s']:5.1f} s, CPU {f['cpu_s']:5.1f} s, steady step {f['step_s']:.3f} s, "
            f"reward {f['reward_last']}, load avg before {load:.2f}",
            flush=True,
        )
    return found


def ratio_line(name: str, rounds: list[dict], top: str, bottom: str) -> str:
    pairs = [r for r in rounds if top in r and bottom in r]
    if not pairs:
        return ""
    each = [r[top]["completions_per_s"] / r[bottom]["completions_per_s"] for r in pairs]
    shown = ", ".join(f"{x:.2f}" for x in each)
    return f"  {name} (completions/s): median {statistics.median(each):.2f}x; per round {shown}"


def report(args, rounds: list[dict], sides: list[str]) -> None:
    print(
        f"\n== GRPO quickstart, {args.steps} steps x {PROMPTS} prompts x {SAMPLES} completions, "
        f"Gantry rollout {args.backend}, TRL {args.trl_version} (own generation), "
        f"{args.rounds} round(s), {os.cpu_count()} CPUs"
    )
    names = {"async": "Gantry async", "trl": "TRL", "sync": "Gantry sync"}
    for side in sides:
        runs = [r[side] for r in rounds]

        def med(key, runs=runs):
            return statistics.median(f[key] for f in runs)

        print(
            f"  {names[side]:12s}: {med('completions_per_s'):6.1f} completions/s, wall "
            f"{med('wall_s'):5.1f} s, CPU {med('cpu_s'):5.1f} s, steady step {med('step_s'):.3f} s"
        )
    for line in (
        ratio_line("Gantry async / TRL", rounds, "async", "trl"),
        ratio_line("Gantry sync / TRL", rounds, "sync", "trl"),
        ratio_line("Gantry async / sync", rounds, "async", "sync"),
    ):
        if line:
            print(line)


def main() -> None:
    args = parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    sides = args.sides.split(",")
    unknown = set(sides) - {"async", "trl", "sync"}
    if unknown:
        raise SystemExit(f"--sides: unknown {sorted(unknown)}; use async, trl, sync")
    python = make_trl_env(args) if "trl" in sides else None
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    rounds = [one_round(args, r, sides, python, model, work) for r in range(args.rounds)]
    report(args, rounds, sides)


if __name__ == "__main__":
    main()
