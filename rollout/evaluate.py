"""The evaluation command: batch inference over validation samples, scored against their answers.

    ./evaluate.sh --config sft.toml datasets/llava_json.py --model outputs/RUN/export/final \\
        [--out eval.json] [--limit N] [key=value ...]

It loads the config and the dataset script as a run does (the script's get_val_dataset, or
get_dataset with --split train), builds each sample's prompt (the messages before its last
assistant turn, with images and videos for a VLM), generates with the config's rollout engine
(vLLM by default; greedy unless --temperature is given), and scores each prediction against the
sample's `answer` with `gantry.data.scoring`: exact and normalised match, multiple choice, numeric
error, per `category`. The JSON report (summary + every record) goes to --out, and the table is
printed. Progress is shown every batch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("gantry.evaluate")
EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.sh", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--config", help="TOML config: rollout engine, [custom] for the script")
    parser.add_argument("dataset", help="dataset script with get_val_dataset(config)")
    parser.add_argument("--model", required=True, help="model directory (an export) or repo id")
    parser.add_argument("--out", default="eval.json", help="JSON report (default: eval.json)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N samples only")
    parser.add_argument("--max-tokens", type=int, default=0, help="default: max_response_length")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    for flag, value in (("--limit", args.limit), ("--max-tokens", args.max_tokens)):
        if value < 0:
            parser.error(f"{flag} must be 0 (all / the default) or more, got {value}")
    return args


def model_problem(model: str) -> str | None:
    """Why --model cannot be loaded, when it names a local path (it exists, starts with . or /,
    or has more than the one slash of a repo id) that is not a model directory; else None."""
    path = Path(model)
    if not (path.exists() or model.startswith((".", "/")) or model.count("/") > 1):
        return None  # a Hugging Face repo id
    if not path.is_dir():
        return (
            f"--model {model}: no such directory; give an exported model directory "
            "(outputs/RUN/export/final) or a Hugging Face repo id"
        )
    if not (path / "config.json").is_file():
        return (
            f"--model {model}: no config.json there, so it is not a model directory; give "
            "an export such as outputs/RUN/export/final or outputs/RUN/export/step_N"
        )
    return None


def answer_records(samples, indices: list[int], predictions: list[str]) -> list[dict]:
    """One scoring record per sample: its prediction and reference, category and choices."""
    records = []
    for index, prediction in zip(indices, predictions, strict=True):
        sample = samples[index]
        reference = sample.get("normalized_answer") or sample.get("answer")
        if not isinstance(reference, str | int | float):
            raise ValueError(
                f"sample {index} has no 'answer' (or 'normalized_answer') to score against"
            )
        record = {
            "id": str(sample.get("id", index)),
            "category": sample.get("category") or "uncategorized",
            "prediction": prediction,
            "reference": str(reference),
        }
        for key in ("choices", "answer_type"):
            if sample.get(key) is not None:
                record[key] = sample[key]
        records.append(record)
    return records


def generate_all(engine, builder, samples, indices, sampling, batch_size: int, script_path):
    """Predictions (text) for `indices`, one generate call per batch, with progress."""
    predictions: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        prompts = builder.build(samples, chunk, script_path)
        outputs = engine.generate(prompts, sampling)
        predictions += builder.tokenizer.batch_decode(
            [outs[0].token_ids for outs in outputs], skip_special_tokens=True
        )
        done = start + len(chunk)
        rate = done / max(time.perf_counter() - started, 1e-9)
        log.info("generated %d/%d (%.1f samples/s)", done, len(indices), rate)
    return predictions


def evaluate(args: argparse.Namespace) -> dict:
    from gantry.config import load_config
    from gantry.data.plugin import load_dataset_script
    from gantry.data.scoring import format_table, summarize, write_report
    from rollout.engine import SamplingSettings
    from rollout.prompts import PromptBuilder
    from rollout.worker import make_engine

    config = load_config(args.config, args.overrides)
    script = load_dataset_script(
        args.dataset,
        need_rewards=False,
        config=config,
        model_path=args.model,
        config_source=args.config,
    )
    samples = (
        script.load_val_samples(config.custom)
        if args.split == "val"
        else script.load_samples(config.custom)
    )
    indices = list(range(len(samples)))[: args.limit or None]
    builder = PromptBuilder(args.model)
    engine = make_engine(config, args.model)
    sampling = SamplingSettings(
        n=1,
        temperature=args.temperature,
        max_tokens=args.max_tokens or config.rollout.max_response_length,
        seed=config.rollout.seed,
        stop_token_ids=[builder.tokenizer.eos_token_id],
        banned_token_ids=builder.banned_token_ids,
    )
    try:
        predictions = generate_all(
            engine, builder, samples, indices, sampling, config.rollout.batch_size, script.path
        )
    finally:
        engine.close()
    records = answer_records(samples, indices, predictions)
    summary = summarize(records)
    path = write_report(records, summary, Path(args.out))
    print(format_table(summary))
    print(f"report: {path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from gantry.config import ConfigError
    from gantry.data.plugin import DatasetScriptError

    if problem := model_problem(args.model):
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        evaluate(args)
    except (ConfigError, DatasetScriptError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
