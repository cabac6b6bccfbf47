"""Benchmark: SFT tokens/s of Gantry's trainer against a plain single-process transformers
training loop on the same data, weights, batches and optimizer, measured in the same process.

    .venv/bin/python bench/sft_throughput.py [--model-size tiny|small] [--data arithmetic|prose]
        [--batch 32] [--mini-batch 8] [--steps 8] [--rounds 3] [--warmup 2] [--threads 1]
        [--lr 1e-3] [--vlm] [--workers 1] [--work-dir /tmp/gantry-bench-sft]

Model: a random Qwen2 built locally (no download), `tiny` (the test model: hidden 128, 2
layers, 0.6M parameters) or `small` (hidden 256, 4 layers), or with --vlm the tiny Qwen2.5-VL.
Data: `arithmetic` (datasets/arithmetic.py: a short question, a one-number answer: ~29
tokens) or `prose` (a question and a 4-12 sentence answer of the tiny tokenizer's words: ~100
tokens); with --vlm every sample also carries a generated image (a PNG file of 56-112 px sides,
as Gantry's datasets do). Both sides load the model fresh from the same directory, in float32, and train
on the same index batches in the same order: --batch conversations a step, --mini-batch a
forward/backward, AdamW with the config's lr / betas / weight decay (0) / foreach kernel,
gradients clipped to 1.0, a constant learning rate, the loss a token mean of the cross-entropy
of the assistant tokens over the whole step. Sides:
  baseline  a plain loop: `AutoModelForCausalLM.from_pretrained`, every conversation tokenized
            once up front with `apply_chat_template` (not timed), the assistant labels = the
            tokens after the generation prompt up to the last `<|im_end|>`; per step: pad each
            micro-batch, forward, cross-entropy (reduction sum / the step's assistant tokens),
            backward; then `clip_grad_norm_`, `optimizer.step`, `zero_grad`.
            With --vlm: `AutoModelForImageTextToText` + `AutoProcessor`, images loaded and
            processed up front too.
  gantry    `policy.sft.SFTTrainer.step(indices, next_indices)` on a world of one (gloo; one
            rank trains the plain module, FSDP2 only wraps a model with ranks to shard over):
            it encodes every conversation every step (chat template, assistant mask, media) in
            --workers encoder processes (train.train_policy.dataloader_num_workers, default 1),
            the next step's while the current one trains, as the policy worker does with the
            controller's `SFTBatch.next_indices`; --workers 0 encodes inline. Its first step
            encodes inline (a warm-up step). Each encoder part groups the step's
            conversations by length before cutting micro-batches (less padding), and the
            model computes logits at the assistant positions only (`logits_to_keep`): the
            same loss with less work, which the baseline's plain loop does not do.
A step's tokens are the non-pad tokens of its conversations: the same count on both sides
(checked every step). Both sides run --warmup steps first (untimed), then --rounds rounds of
--steps steps each, the sides alternating which goes first; each round is timed as a whole
(perf_counter around the step calls) and gives tokens / seconds. Both sides see the same
batches in the same order, so their models stay the same: the losses of every step are
compared (the first steps' are printed; they agree to float32 rounding).

Both sides run with --threads compute threads (`torch.set_num_threads`, default 1: on a
shared 2-core machine 2 threads made a step up to 15x slower whenever another job held a core).

Reading the figures: "tokens/s" per side is the median over rounds; the verdict is the median
of the per-round ratios gantry / baseline against the goal (>= 1.0x). The CPU time per step
is printed too (the process's `time.process_time` plus, for Gantry, its encoder processes'
from /proc), with the median per-round ratio baseline / gantry: Gantry encodes every step
where the baseline tokenized once, untimed, so its CPU time is higher where its wall clock is
not; on a machine shared with other jobs CPU time also tells a real gap from noise. Rounds
further apart than 20% on one side mean other jobs were busy. A breakdown (one more round per
side, with the functions each side calls wrapped in timers: bench/sft_phases.py) splits a
step's milliseconds into encoding (Gantry only: the wait for the encoder processes, or inline
encoding), collating / padding (Gantry: moving the micro-batches to the device), forward (with
the cross-entropy), backward, gradient clipping, the optimizer step and the rest, to show
where a gap comes from.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `gantry` and `policy` importable

from bench.sft_phases import measure_breakdown  # noqa: E402

GOAL_RATIO = 1.0
NOISY_SPREAD = 0.2
IGNORE = -100
SIZES = {"tiny": dict(hidden_size=128, num_layers=2), "small": dict(hidden_size=256, num_layers=4)}
# The tiny tokenizer's corpus words (gantry.models.tiny): mostly one token each.
WORDS = (
    "what is the sum of and answer reply with only a number digit plus minus equals you are "
    "helpful question count letters word in sort reverse copy following text please think step by "
    "final"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--data", default="arithmetic", choices=("arithmetic", "prose"))
    parser.add_argument("--batch", type=int, default=32, help="conversations per step")
    parser.add_argument("--mini-batch", type=int, default=8, help="conversations per fwd/bwd")
    parser.add_argument("--steps", type=int, default=8, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vlm", action="store_true", help="the tiny Qwen2.5-VL, an image each")
    parser.add_argument("--workers", type=int, default=1, help="Gantry's encoder processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/gantry-bench-sft", help="models and images")
    return parser.parse_args()


# ---- model, data, config -------------------------------------------------------------------


def model_dir(work: Path, size: str, vlm: bool) -> Path:
    """The model, built once under `work` (random weights, no download)."""
    from gantry.models.tiny import ensure_tiny_model, ensure_tiny_vlm

    if vlm:
        return ensure_tiny_vlm(work / f"vlm-{size}", **SIZES[size])
    return ensure_tiny_model(work / f"qwen2-{size}", **SIZES[size])


def prose_samples(count: int, seed: int) -> list[dict]:
    """Conversations with a multi-sentence assistant reply (4-12 sentences of 3-10 words)."""
    rng, words = random.Random(seed), WORDS.split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + "."

    samples = []
    for _ in range(count):
        question = f"Please think step by step: {sentence()} {rng.randint(0, 99)}?"
        reply = " ".join(sentence() for _ in range(rng.randint(4, 12)))
        user = {"role": "user", "content": question}
        samples.append({"messages": [user, {"role": "assistant", "content": reply}]})
    return samples


def make_samples(args, count: int, image_dir: Path) -> list[dict]:
    if args.data == "prose":
        samples = prose_samples(count, args.seed)
    else:
        from gantry.data.plugin import load_dataset_script

        script = load_dataset_script(ROOT / "datasets/arithmetic.py")
        samples = script.get_dataset({"size": count, "seed": args.seed})
    if args.vlm:
        samples = [with_image(s, i, image_dir) for i, s in enumerate(samples)]
    return samples


def with_image(sample: dict, index: int, image_dir: Path) -> dict:
    """The sample with a generated image (56-112 px sides: 4-16 merged patches) before its
    question, saved as a PNG once."""
    import numpy as np
    from PIL import Image

    path = image_dir / f"{index}.png"
    if not path.exists():
        rng = np.random.default_rng(index)
        height, width = (int(s) for s in rng.choice([56, 84, 112], size=2))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    user, assistant = sample["messages"]
    content = [{"type": "image", "image": str(path)}, {"type": "text", "text": user["content"]}]
    return {**sample, "messages": [{"role": "user", "content": content}, assistant]}


def gantry_config(args):
    from gantry.config import load_config

    return load_config(
        None,
        [
            "train.train_policy.type=sft",
            "train.param_dtype=float32",
            f"train.train_batch_per_replica={args.batch}",
            f"train.train_policy.mini_batch={args.mini_batch}",
            f"train.optm_lr={args.lr}",
            f"train.seed={args.seed}",
            f"train.train_policy.dataloader_num_workers={args.workers}",
        ],
    )


def index_batches(args, count: int) -> list[list[int]]:
    """The step batches: a shuffled pass over the samples, cut into --batch indices."""
    order = list(range(count))
    random.Random(args.seed).shuffle(order)
    return [order[i : i + args.batch] for i in range(0, count, args.batch)]


# ---- the baseline ----------------------------------------------------------------------------


class PlainLoop:
    """A plain single-process transformers SFT loop: tokenized once, padded per micro-batch."""

    def __init__(self, path: Path, samples: list[dict], config, vlm: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.torch = torch
        train = config.train
        model_class = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
        self.model = model_class.from_pretrained(path, dtype=torch.float32)
        self.model.train()
        self.rows = tokenize_all(path, samples, vlm)
        pad = getattr(self.model.config, "text_config", self.model.config).pad_token_id
        self.pad_token_id = pad or 0
        self.mini_batch, self.clip = train.train_policy.mini_batch, train.optm_grad_norm_clip
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=train.optm_lr, betas=tuple(train.optm_betas),
            weight_decay=train.optm_weight_decay, foreach=train.optm_impl == "foreach",
        )  # fmt: skip

    def step(self, indices: list[int], next_indices=()) -> dict[str, float]:
        torch = self.torch
        rows = [self.rows[i] for i in indices]
        size = self.mini_batch
        micro = [self.pad(rows[i : i + size]) for i in range(0, len(rows), size)]
        total = sum(int((b["labels"] != IGNORE).sum()) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            loss = self._loss_sum(batch) / total
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(r["input_ids"]) for r in rows)
        return {"loss": loss_sum, "tokens": float(tokens), "assistant_tokens": float(total)}

    def _loss_sum(self, batch: dict):
        """Summed cross-entropy of the assistant tokens: forward without labels, then CE."""
        labels = batch.pop("labels")
        logits = self.model(**batch).logits[:, :-1]
        return self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=IGNORE, reduction="sum",
        )  # fmt: skip

    def pad(self, rows: list[dict]) -> dict:
        torch = self.torch
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n], labels[i, :n] = row["input_ids"], row["labels"]
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "pixel_values" in rows[0]:
            batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
            batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in rows])
            batch["mm_token_type_ids"] = torch.zeros_like(input_ids)
            for i, row in enumerate(rows):
                batch["mm_token_type_ids"][i, : len(row["input_ids"])] = row["mm_token_type_ids"]
        return batch


def tokenize_all(path: Path, samples: list[dict], vlm: bool) -> list[dict]:
    """Every conversation as tensors: input_ids, labels (IGNORE outside the assistant reply),
    and for a VLM the processor's pixel_values, image_grid_thw and mm_token_type_ids."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    if vlm:
        from PIL import Image

        processor = AutoProcessor.from_pretrained(path)
        end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for sample in samples:
        messages = sample["messages"]
        if vlm:
            image = Image.open(messages[0]["content"][0]["image"]).convert("RGB")
            text = processor.apply_chat_template(messages, tokenize=False)
            head = processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
            full = processor(text=[text], images=[image], return_tensors="pt")
            prompt = processor(text=[head], images=[image], return_tensors="pt")
            ids, start = full["input_ids"][0], prompt["input_ids"].shape[1]
            extra = {k: full[k] for k in ("pixel_values", "image_grid_thw")}
            extra["mm_token_type_ids"] = full["mm_token_type_ids"][0]  # M-RoPE of the patches
        else:
            ids = torch.tensor(tokenizer.apply_chat_template(messages, return_dict=False))
            start = len(
                tokenizer.apply_chat_template(
                    messages[:-1], add_generation_prompt=True, return_dict=False
                )
            )
            extra = {}
        end = int((ids == end_id).nonzero()[-1]) + 1  # through the reply's <|im_end|>
        labels = torch.full_like(ids, IGNORE)
        labels[start:end] = ids[start:end]
        rows.append({"input_ids": ids, "labels": labels, **extra})
    return rows


# ---- Gantry ----------------------------------------------------------------------------------


def gantry_trainer(path: Path, samples: list[dict], config, steps: int):
    from policy.parallel import ParallelDims, build_mesh, init_distributed
    from policy.sft import SFTTrainer

    env = init_distributed()
    mesh = build_mesh(ParallelDims(dp_replicate=1, dp_shard=1), env.device)
    return SFTTrainer(config, str(path), env, mesh, steps, samples)


def check_same_tokens(trainer, plain: PlainLoop, samples: list[dict]) -> None:
    """Gantry's encoder and the baseline's tokenization give the same ids and assistant mask."""
    for i, sample in enumerate(samples):
        example, row = trainer.steps.inline.encoder.encode(sample, i), plain.rows[i]
        mask = (row["labels"] != IGNORE).tolist()
        if example.input_ids != row["input_ids"].tolist() or example.loss_mask != mask:
            raise SystemExit(f"sample {i}: the two sides tokenize it differently; fix the bench")


# ---- measurement -----------------------------------------------------------------------------


def run_steps(side, batches: list[list[int]], then: list[int]) -> tuple[float, float, list[dict]]:
    """Wall seconds, CPU seconds (this process and Gantry's encoder processes), and the
    metrics of each step; each step is told the next one's indices (`then` after the last)."""
    started, cpu = time.perf_counter(), cpu_seconds(side)
    following = batches[1:] + [then]
    metrics = [side.step(b, n) for b, n in zip(batches, following, strict=True)]
    return time.perf_counter() - started, cpu_seconds(side) - cpu, metrics


def cpu_seconds(side) -> float:
    """CPU time of this process plus that of the side's encoder processes (from /proc)."""
    total = time.process_time()
    pool = getattr(getattr(side, "steps", None), "pool", None)
    for pid in getattr(pool, "_processes", None) or {}:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def measure(args, sides: dict, batches: list[list[int]]) -> dict:
    """Warm-up, then the alternating timed rounds; every step's metrics of each side."""
    need = args.warmup + args.rounds * args.steps
    plan = [batches[i % len(batches)] for i in range(need)]
    figures = {name: {"seconds": [], "cpu": [], "tokens": [], "metrics": []} for name in sides}
    plan.append([])  # the last step has no next one
    for name, side in sides.items():
        figures[name]["metrics"] += run_steps(side, plan[: args.warmup], plan[args.warmup])[2]
    for r in range(args.rounds):
        start = args.warmup + r * args.steps
        chunk, then = plan[start : start + args.steps], plan[start + args.steps]
        names = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in names:
            seconds, cpu, metrics = run_steps(sides[name], chunk, then)
            figures[name]["seconds"].append(seconds)
            figures[name]["cpu"].append(cpu)
            figures[name]["tokens"].append(sum(m["tokens"] for m in metrics))
            figures[name]["metrics"] += metrics
    return figures


# ---- report ----------------------------------------------------------------------------------


def report(args, figures: dict, phases: dict, params: int, tokens_per_step: float) -> None:
    base, gantry = figures["baseline"], figures["gantry"]
    for m_base, m_gantry in zip(base["metrics"], gantry["metrics"], strict=True):
        if m_base["tokens"] != m_gantry["tokens"]:
            raise SystemExit(f"token counts differ: {m_base['tokens']} vs {m_gantry['tokens']}")
    what = "Qwen2.5-VL" if args.vlm else "Qwen2"
    print(
        f"\n== {args.model_size} {what} ({params / 1e6:.2f}M params, float32), data {args.data}, "
        f"batch {args.batch} / mini-batch {args.mini_batch}, {tokens_per_step:.0f} tokens a step; "
        f"{args.threads} threads; {args.warmup} warm-up steps, {args.rounds} rounds x "
        f"{args.steps} steps per side"
    )
    pairs = zip(base["metrics"], gantry["metrics"], strict=True)
    losses = [(b["loss"], g["loss"]) for b, g in pairs]
    first = ", ".join(f"{b:.6f} / {g:.6f}" for b, g in losses[:3])
    worst = max(abs(b - g) / max(abs(b), 1e-12) for b, g in losses)
    print(f"  losses baseline / gantry, first steps: {first}; "
          f"largest relative difference over all {len(losses)} steps: {worst:.1e}")  # fmt: skip
    rates = {}
    for name, fig in figures.items():
        rates[name] = [t / s for t, s in zip(fig["tokens"], fig["seconds"], strict=True)]
        per_step = 1e3 * statistics.median(fig["seconds"]) / args.steps
        cpu = 1e3 * statistics.median(fig["cpu"]) / args.steps
        print(
            f"  {name:<9} median {statistics.median(rates[name]):9.0f} tokens/s  "
            f"({per_step:.1f} ms a step, {cpu:.1f} ms CPU)  "
            f"rounds [{', '.join(f'{r:.0f}' for r in rates[name])}]"
        )
        if max(rates[name]) > (1 + NOISY_SPREAD) * min(rates[name]):
            print(f"  warning: {name} rounds differ by more than {NOISY_SPREAD:.0%}: busy machine?")
    order = ("encode", "collate", "forward", "backward", "clip", "optimizer")
    print("  ms a step:  " + "".join(f"{p:>10}" for p in (*order, "other", "step")))
    for name, phase in phases.items():
        other = phase["step"] - sum(phase.get(p, 0.0) for p in order)
        cells = [phase.get(p, 0.0) for p in order] + [other, phase["step"]]
        print(f"  {name:<10}  " + "".join(f"{1e3 * c:10.2f}" for c in cells))
    ratios = [g / b for g, b in zip(rates["gantry"], rates["baseline"], strict=True)]
    ratio = statistics.median(ratios)
    cpu = statistics.median(b / g for g, b in zip(gantry["cpu"], base["cpu"], strict=True))
    print(f"  CPU time baseline / gantry: {cpu:.3f}x (median of rounds; less sensitive to "
          "other jobs than the wall-clock ratio)")  # fmt: skip
    verdict = "PASS" if ratio >= GOAL_RATIO else "BELOW GOAL"
    print(
        f"  ratio gantry / baseline: {ratio:.3f}x (median of rounds "
        f"[{', '.join(f'{r:.3f}' for r in ratios)}]; goal >= {GOAL_RATIO}x): {verdict}"
    )


def main() -> None:
    args = parse_args()
    if args.batch % args.mini_batch:
        raise SystemExit("--batch must be a multiple of --mini-batch")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    image_dir = work / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir(work, args.model_size, args.vlm)
    count = args.batch * (args.warmup + args.rounds * args.steps)
    samples = make_samples(args, count, image_dir)
    config = gantry_config(args)
    batches = index_batches(args, len(samples))
    plain = PlainLoop(path, samples, config, args.vlm)
    trainer = gantry_trainer(path, samples, config, args.warmup + args.rounds * args.steps)
    check_same_tokens(trainer, plain, samples)
    params = sum(p.numel() for p in plain.model.parameters())
    figures = measure(args, {"baseline": plain, "gantry": trainer}, batches)
    phases = measure_breakdown(args, trainer, plain, batches)
    trainer.close()
    tokens = statistics.mean(m["tokens"] for m in figures["gantry"]["metrics"])
    report(args, figures, phases, params, tokens)


if __name__ == "__main__":
    main()
