"""The evaluation command (rollout/evaluate.py): samples to scoring records, a whole run on the
tiny Qwen2.5-VL over a LLaVA-format validation file (images, a text-only sample, categories,
a multiple-choice entry) with the transformers engine and, slow, with vLLM, and the bad inputs
that must stop it with exit code 2 and a message saying what to fix.

The model is random, so its predictions are unknown: a run is checked by re-scoring the
report's records (the written summary must be theirs), by greedy determinism, and against
transformers itself (`generate` and forward passes on the processor's inputs). For vLLM that
includes what GRPO on VLMs relies on: the prompt ids it reports for an image prompt are the
processor's, and its log-probs are transformers'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from gantry.config import load_config
from gantry.data.plugin import load_dataset_script
from gantry.data.scoring import format_table, score_record, summarize
from rollout import evaluate
from rollout.engine import MultimodalPrompt, SamplingSettings
from rollout.evaluate import EXIT_BAD_INPUT, answer_records
from rollout.prompts import PromptBuilder

ROOT = Path(__file__).resolve().parents[1]
LLAVA = ROOT / "datasets" / "llava_json.py"
LIMIT = 4  # of the 5 entries: the last one must not be evaluated
MAX_TOKENS = 4
LOGPROB_TOL = 1e-4
FAST = ["rollout.batch_size=2", f"rollout.max_response_length={MAX_TOKENS}"]
TRANSFORMERS = ["rollout.backend=transformers", *FAST]
# vLLM's CPU build reserves a KV cache for the whole model_max_length; keep it small.
VLLM = ["rollout.backend=vllm", "policy.model_max_length=1024", *FAST]


def _entry(entry_id, question, answer, category, image=None, **extra) -> dict:
    entry = {
        "id": entry_id,
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ],
        "category": category,
        **extra,
    }
    if image:
        entry["image"] = f"images/{image}"
    return entry


# Batches of 2: [q0, q1] both with images, [q2, q3] a text-only prompt beside an image one.
ENTRIES = [
    _entry("q0", "<image>\nWhat colour is this?", "red", "colour", "red.png"),
    _entry("q1", "<image>\nWhat colour is this?", "blue", "colour", "blue.png"),
    _entry("q2", "What is 1 + 1?", "2", "math"),
    _entry(
        "q3",
        "<image>\nWhich colour is it? A. red B. green",
        "B",
        "choice",
        "green.png",
        choices=["red", "green"],
        answer_type="multiple_choice",
    ),
    _entry("q4", "<image>\nWhat colour is this?", "white", "colour", "white.png"),
]
IMAGES = {
    "red.png": ((84, 56), (220, 20, 20)),
    "blue.png": ((56, 84), (20, 20, 220)),
    "green.png": ((56, 56), (20, 200, 20)),
    "white.png": ((56, 56), (250, 250, 250)),
}


def write_config(path: Path, val_annotation: Path, on_bad_entry: str = "fail") -> Path:
    path.write_text(
        "[custom.dataset]\n"
        f'annotation_path = "{val_annotation}"\n'
        f'val_annotation_path = "{val_annotation}"\n'
        f'on_bad_entry = "{on_bad_entry}"\n'
        "[custom.vision]\n"
        f"max_pixels = {56 * 56}\n"
    )
    return path


@pytest.fixture(scope="module")
def val_config(tmp_path_factory) -> Path:
    """A LLaVA-format validation file with its images, and the config that points at it."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    for name, (size, colour) in IMAGES.items():
        Image.new("RGB", size, colour).save(root / "images" / name)
    (root / "val.json").write_text(json.dumps(ENTRIES))
    return write_config(root / "eval.toml", root / "val.json")


def run_evaluate(config: Path, model: Path | str, out: Path, *extra: str) -> int:
    argv = ["--config", str(config), str(LLAVA), "--model", str(model), "--out", str(out)]
    return evaluate.main([*argv, *extra])


def evaluate_ok(capsys, config, model, out, *extra) -> tuple[dict, str]:
    """Run the command, check it succeeded, return its report and what it printed."""
    code = run_evaluate(config, model, out, "--limit", str(LIMIT), *extra)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(out.read_text()), captured.out


def predictions(report: dict) -> list[str]:
    return [record["prediction"] for record in report["records"]]


# --------------------------------------------------------------------------------------------
# Samples to scoring records


def test_answer_records_map_samples_to_scoring_records():
    samples = [
        {"id": "a", "answer": "Paris", "category": "geo"},
        {"answer": "The answer is B", "normalized_answer": "B", "choices": ["x", "y"]},
        {"id": 7, "answer": 3, "answer_type": "numeric", "category": ""},
        {"id": "unused", "answer": "no"},
    ]
    records = answer_records(samples, [0, 1, 2], ["paris", "(B)", "3.0"])
    assert records == [
        {"id": "a", "category": "geo", "prediction": "paris", "reference": "Paris"},
        {
            "id": "1",  # no id: the sample's index
            "category": "uncategorized",
            "prediction": "(B)",
            "reference": "B",  # normalized_answer first
            "choices": ["x", "y"],
        },
        {
            "id": "7",
            "category": "uncategorized",  # an empty category too
            "prediction": "3.0",
            "reference": "3",
            "answer_type": "numeric",
        },
    ]
    assert [score_record(record)["correct"] for record in records] == [True, True, True]


def test_answer_records_name_a_sample_without_answer():
    samples = [{"answer": "x"}, {"id": "q", "messages": []}, {"answer": None}]
    with pytest.raises(ValueError, match=r"sample 1 has no 'answer'"):
        answer_records(samples, [0, 1], ["x", "y"])
    with pytest.raises(ValueError, match=r"sample 2 has no 'answer'"):
        answer_records(samples, [2], ["z"])


# --------------------------------------------------------------------------------------------
# The whole command, transformers engine


def test_evaluate_with_transformers_engine(tiny_vlm, val_config, tmp_path, capsys):
    report, printed = evaluate_ok(
        capsys, val_config, tiny_vlm, tmp_path / "eval.json", *TRANSFORMERS
    )
    assert set(report) == {"summary", "records"}
    records = report["records"]
    assert [r["id"] for r in records] == [e["id"] for e in ENTRIES[:LIMIT]]  # --limit
    for record, entry in zip(records, ENTRIES, strict=False):
        assert record["category"] == entry["category"]
        assert record["reference"] == entry["conversations"][-1]["value"]
        assert isinstance(record["prediction"], str)
        assert isinstance(record["scores"]["correct"], bool)
    assert records[3]["choices"] == ["red", "green"]
    assert records[3]["scores"]["answer_type"] == "multiple_choice"
    assert records[2]["scores"]["answer_type"] == "numeric"  # inferred from the reference "2"

    summary = report["summary"]
    assert summary["categories"].keys() == {"colour", "math", "choice"}
    assert summary["overall"]["count"] == LIMIT
    assert summary["categories"]["colour"]["count"] == 2
    # The written summary and scores are those of the records' predictions.
    unscored = [{k: v for k, v in r.items() if k != "scores"} for r in records]
    assert json.loads(json.dumps(summarize(unscored))) == summary
    assert [score_record(r) for r in unscored] == [r["scores"] for r in records]

    # The printed table: one row per category, then overall.
    assert format_table(summary) in printed
    rows = {line.split()[0] for line in printed.splitlines() if line.strip()}
    assert {"colour", "math", "choice", "overall"} <= rows
    assert f"report: {tmp_path / 'eval.json'}" in printed

    # Greedy decoding: a second run predicts the same.
    again, _ = evaluate_ok(capsys, val_config, tiny_vlm, tmp_path / "again.json", *TRANSFORMERS)
    assert predictions(again) == predictions(report)


# --------------------------------------------------------------------------------------------
# Against transformers itself: the model's own inputs (the processor's, with the
# mm_token_type_ids from which Qwen2.5-VL builds its 3-D M-RoPE positions for image tokens)


@dataclass
class Reference:
    builder: PromptBuilder
    model: torch.nn.Module
    prompts: list  # of the first LIMIT samples: ids (text) or MultimodalPrompt (images)
    predictions: list[str]  # greedy, MAX_TOKENS tokens, decoded as the command decodes them


def reference_inputs(reference: Reference, prompt, completion: Sequence[int] = ()) -> dict:
    """transformers' inputs for prompt + completion, as the processor makes them."""
    if not isinstance(prompt, MultimodalPrompt):
        ids = torch.tensor([[*prompt, *completion]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = prompt.media.processor_kwargs()
    inputs = dict(reference.builder.processor(text=[prompt.text], **kwargs, return_tensors="pt"))
    tail = torch.tensor([list(completion)], dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:  # completion tokens are text
        mm = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tail, dtype=mm.dtype)], 1)
    return inputs


@pytest.fixture(scope="module")
def reference(tiny_vlm, val_config) -> Reference:
    script = load_dataset_script(LLAVA, need_rewards=False)
    samples = script.load_val_samples(load_config(val_config).custom)
    builder = PromptBuilder(str(tiny_vlm))
    prompts = builder.build(samples, list(range(LIMIT)), script.path)
    assert [isinstance(p, MultimodalPrompt) for p in prompts] == [True, True, False, True]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).eval()
    reference = Reference(builder, model, prompts, [])
    banned = [[token] for token in builder.banned_token_ids] or None  # as the command bans them
    for prompt in prompts:
        inputs = reference_inputs(reference, prompt)
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, bad_words_ids=banned
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        reference.predictions.append(builder.tokenizer.decode(new, skip_special_tokens=True))
    return reference


def test_transformers_backend_predicts_like_transformers(
    reference, tiny_vlm, val_config, tmp_path, capsys
):
    report, _ = evaluate_ok(capsys, val_config, tiny_vlm, tmp_path / "hf.json", *TRANSFORMERS)
    assert predictions(report) == reference.predictions


# --------------------------------------------------------------------------------------------
# The whole command, vLLM engine (CPU build, in-process)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluate_with_vllm_engine(reference, tiny_vlm, val_config, tmp_path, capsys):
    pytest.importorskip("vllm")
    report, printed = evaluate_ok(capsys, val_config, tiny_vlm, tmp_path / "eval.json", *VLLM)
    assert [r["id"] for r in report["records"]] == [e["id"] for e in ENTRIES[:LIMIT]]
    assert report["summary"]["categories"].keys() == {"colour", "math", "choice"}
    unscored = [{k: v for k, v in r.items() if k != "scores"} for r in report["records"]]
    assert json.loads(json.dumps(summarize(unscored))) == report["summary"]
    assert format_table(report["summary"]) in printed
    # Greedy, as transformers decodes (the smallest top-two logit gap of these is ~7e-4,
    # vLLM's float32 log-probs are within ~1e-6 of transformers').
    assert predictions(report) == reference.predictions


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_sees_the_processor_ids_and_computes_transformers_logprobs(reference, tiny_vlm):
    """What GRPO on VLMs relies on: the prompt ids vLLM reports for an image prompt (patch
    tokens expanded) are the processor's, and its log-probs are transformers'."""
    pytest.importorskip("vllm")
    from rollout.vllm_engine import VLLMEngine

    banned = reference.builder.banned_token_ids  # media tokens: never sampled
    assert banned
    engine = VLLMEngine(str(tiny_vlm), max_model_len=1024, dtype="float32")
    try:
        greedy = engine.generate(
            reference.prompts,
            SamplingSettings(n=1, temperature=0.0, max_tokens=MAX_TOKENS, banned_token_ids=banned),
        )
        sampled = engine.generate(
            reference.prompts,
            SamplingSettings(n=2, temperature=1.0, max_tokens=8, seed=3, banned_token_ids=banned),
        )
    finally:
        engine.close()
    processor = reference.builder.processor
    for prompt, (completion,) in zip(reference.prompts, greedy, strict=True):
        if isinstance(prompt, MultimodalPrompt):
            kwargs = prompt.media.processor_kwargs()
            expected = processor(text=[prompt.text], **kwargs)["input_ids"][0]
            assert completion.prompt_token_ids == list(expected)
        else:
            assert completion.prompt_token_ids is None
    decoded = [
        reference.builder.tokenizer.decode(c.token_ids, skip_special_tokens=True) for (c,) in greedy
    ]
    assert decoded == reference.predictions
    for prompt, group in zip(reference.prompts, sampled, strict=True):
        for completion in group:
            inputs = reference_inputs(reference, prompt, completion.token_ids)
            with torch.no_grad():
                logits = reference.model(**inputs).logits[0]
            n = len(completion.token_ids)
            logits[:, banned] = float("-inf")  # never sampled: outside the distribution
            logprobs = logits[-n - 1 : -1].log_softmax(-1)
            expected = logprobs.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=LOGPROB_TOL)


# --------------------------------------------------------------------------------------------
# Bad inputs: exit code 2 and a message that says what to fix


def test_missing_model_directory(val_config, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-model"
    assert run_evaluate(val_config, missing, tmp_path / "e.json") == EXIT_BAD_INPUT
    assert f"--model {missing}: no such directory" in capsys.readouterr().err
    # The documented relative form, which is no repo id (more than one slash).
    monkeypatch.chdir(tmp_path)
    relative = "outputs/RUN/export/final"
    assert run_evaluate(val_config, relative, tmp_path / "e.json") == EXIT_BAD_INPUT
    assert f"--model {relative}: no such directory" in capsys.readouterr().err
    # A directory that is no model (the export's parent, say).
    (tmp_path / "outputs" / "RUN" / "export").mkdir(parents=True)
    assert run_evaluate(val_config, "outputs/RUN/export", tmp_path / "e.json") == EXIT_BAD_INPUT
    assert "no config.json there" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_dataset_script_without_get_val_dataset(tiny_vlm, val_config, tmp_path, capsys):
    script = tmp_path / "train_only.py"
    script.write_text("def get_dataset(config):\n    return [{'prompt': 'hi', 'answer': 'x'}]\n")
    argv = ["--config", str(val_config), str(script), "--model", str(tiny_vlm)]
    assert evaluate.main([*argv, "--out", str(tmp_path / "e.json")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "get_val_dataset" in err and str(script) in err
    assert not (tmp_path / "e.json").exists()


def test_missing_media_file_names_the_file_and_entry(tiny_vlm, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (56, 56)).save(tmp_path / "images" / "here.png")
    entries = [
        _entry("fine", "<image>\nWhat?", "black", "colour", "here.png"),
        _entry("lost-7", "<image>\nWhat?", "black", "colour", "gone.png"),
    ]
    (tmp_path / "val.json").write_text(json.dumps(entries))
    config = write_config(tmp_path / "eval.toml", tmp_path / "val.json", on_bad_entry="fail")
    out = tmp_path / "e.json"
    assert run_evaluate(config, tiny_vlm, out, *TRANSFORMERS) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "entry lost-7" in err and str(tmp_path / "images" / "gone.png") in err
    assert 'on_bad_entry = "skip"' in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--limit", "--max-tokens"])
def test_negative_counts_are_refused(val_config, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        run_evaluate(val_config, tmp_path, tmp_path / "e.json", flag, "-1")
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert f"{flag} must be 0" in capsys.readouterr().err
