"""SFT: the assistant-token loss mask (token by token, text and images), the SFT step on an image
sample, two FSDP2 ranks with and without images taking the same step as one process, and a
whole SFT run of a VLM through the launcher whose export reloads with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from policy.sft_data import ConversationEncoder, collate, expand_mask, span_mask
from tests.distributed_helpers import ROOT, run_ranks

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of masked-in tokens."""
    runs, current = [], []
    for token, keep in zip(ids, mask, strict=True):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_mask_covers_exactly_the_assistant_turns(tiny_llm):
    encoder = ConversationEncoder(str(tiny_llm), 4096, vision=False)
    tok = encoder.tokenizer
    replies = ["The answer is 7.", "Sum it: 3 + 4 = 7"]
    sample = {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": replies[1]},
        ]
    }
    example = encoder.encode(sample, 0)
    full = tok.apply_chat_template(sample["messages"], tokenize=False)
    assert example.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    # Each assistant turn is trained on its content and the token that ends it, nothing else.
    expected = [tok(r + "<|im_end|>", add_special_tokens=False)["input_ids"] for r in replies]
    assert masked_runs(example.input_ids, example.loss_mask) == expected
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for token, keep in zip(example.input_ids, example.loss_mask, strict=True):
        assert not (token == im_start and keep)
    # The batch's targets are the masked tokens, shifted by one.
    batch = collate([example], tok.pad_token_id, torch.device("cpu"))
    trained = batch.targets[0][batch.targets[0] != -100].tolist()
    assert trained == expected[0] + expected[1]


def test_span_mask_is_the_tokens_inside_a_span(tiny_llm):
    """The bisection gives what testing every token against every span gives, on the
    tokenizer's own offsets (multi-byte characters split over tokens included)."""
    import random

    encoder = ConversationEncoder(str(tiny_llm), 4096, vision=False)
    rng = random.Random(0)
    words = ["7", "Sum", " it", "é", "日本", "🙂", "\n", "  ", "<|im_end|>", "x"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        offsets = encoder.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        spans = list(zip(cuts[::2], cuts[1::2], strict=False))
        naive = [int(any(lo <= a and b <= hi for lo, hi in spans)) for a, b in offsets]
        assert span_mask(offsets, spans) == naive, (text, spans)


def test_mask_with_an_image_skips_the_patch_tokens(tiny_vlm, tmp_path):
    Image.new("RGB", (60, 60), (200, 10, 10)).save(tmp_path / "red.png")
    encoder = ConversationEncoder(str(tiny_vlm), 4096, vision=True)
    tok = encoder.tokenizer
    image = {"type": "image", "image": str(tmp_path / "red.png"), "max_pixels": 56 * 56}
    sample = {
        "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "red"},
        ]
    }
    example = encoder.encode(sample, 0)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    grid = example.vision.tensors["image_grid_thw"]
    assert example.input_ids.count(pad) == int(grid.prod()) // 4 == 4  # 56x56: 2x2 merged
    assert example.vision.tensors["pixel_values"].shape[0] == int(grid.prod())
    expected = tok("red<|im_end|>", add_special_tokens=False)["input_ids"]
    assert masked_runs(example.input_ids, example.loss_mask) == [expected]


def test_expand_mask_follows_the_patch_runs():
    assert expand_mask([1, 9, 2, 3], [0, 0, 1, 1], [1, 9, 9, 9, 2, 3], {9}) == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="differ"):
        expand_mask([1, 2], [0, 1], [1, 5], {9})


def test_a_conversation_without_assistant_turn_is_named(tiny_llm):
    encoder = ConversationEncoder(str(tiny_llm), 4096, vision=False)
    sample = {"id": "q7", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValueError, match=r"sample 3 \(id q7\): no assistant turn"):
        encoder.encode(sample, 3)


def test_long_text_is_truncated_but_long_media_is_refused(tiny_llm, tiny_vlm, tmp_path):
    text = {
        "messages": [
            {"role": "user", "content": "hi " * 50},
            {"role": "assistant", "content": "ok"},
        ]
    }
    encoder = ConversationEncoder(str(tiny_llm), 16, vision=False)
    cut = encoder.encode(text, 0)
    assert len(cut.input_ids) == 16 and cut.truncated
    Image.new("RGB", (280, 280)).save(tmp_path / "big.png")
    image = {"type": "image", "image": str(tmp_path / "big.png")}
    sample = {"messages": [{"role": "user", "content": [image]}, text["messages"][1]]}
    with pytest.raises(ValueError, match="policy.model_max_length = 32"):
        ConversationEncoder(str(tiny_vlm), 32, vision=True).encode(sample, 0)


def _llava_fixture(root: Path) -> Path:
    """Two LLaVA-format entries with images, written for the dataset script to load."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (84, 56), (220, 20, 20)).save(root / "images" / "red.png")
    Image.new("RGB", (56, 84), (20, 20, 220)).save(root / "images" / "blue.png")
    entries = [
        {
            "id": name,
            "image": f"images/{name}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"},
                {"from": "gpt", "value": f"It is {name}."},
            ],
            "category": "colour",
        }
        for name in ("red", "blue")
    ]
    (root / "train.json").write_text(json.dumps(entries))
    return root


SFT_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from gantry.config import load_config
    from policy.parallel import build_mesh, init_distributed
    from policy.sft import SFTTrainer
    from policy.worker import parallel_dims

    def main():
        model_dir, image, out, batch = sys.argv[1:5]
        shards = int(os.environ["WORLD_SIZE"])
        config = load_config(None, ['train.train_policy.type="sft"',
                                    'train.param_dtype="float32"',
                                    f"policy.parallelism.dp_shard_size={shards}",
                                    "train.optm_lr=1e-2", f"train.train_batch_per_replica={batch}",
                                    "train.train_policy.mini_batch=1", "validation.batch_size=1"])
        picture = {"type": "image", "image": image, "max_pixels": 3136}
        samples = [
            {"messages": [{"role": "user",
                           "content": [picture, {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": "Say hi"},
                          {"role": "assistant", "content": "hi there"}]},
        ]
        env = init_distributed()
        mesh = build_mesh(parallel_dims(config), env.device)
        trainer = SFTTrainer(config, model_dir, env, mesh, 10, samples, samples[:1] + samples)
        # Each step's next one announced: steps 2 and 3 come from the encoder processes.
        steps = [trainer.step([0, 1], [0, 1] if i < 2 else []) for i in range(3)]
        result = {"steps": steps, "val": trainer.validate()}
        trainer.close()
        if env.rank == 0:
            json.dump(result, open(out, "w"))
        dist.destroy_process_group()
        # torch 2.13's gloo can abort at interpreter shutdown (see policy/__main__.py)
        sys.stdout.flush()
        os._exit(0)

    if __name__ == "__main__":  # the spawned encoder processes import this script too
        main()
    """
)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_ranks_with_and_without_images_take_the_one_process_step(tiny_vlm, tmp_path):
    """Rank 0 trains on the image sample, rank 1 on the text one (its vision tower runs on a
    blank image so FSDP's collectives match); the losses equal one process's on both."""
    Image.new("RGB", (60, 60), (200, 0, 0)).save(tmp_path / "red.png")
    script = tmp_path / "sft_rank.py"
    script.write_text(SFT_RANK_SCRIPT)
    args = [tiny_vlm, tmp_path / "red.png"]
    run_ranks(script, 2, [*args, tmp_path / "two.json", 2], timeout=280)
    run_ranks(script, 1, [*args, tmp_path / "one.json", 2], timeout=280)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    for a, b in zip(two["steps"], one["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["assistant_tokens"] == b["assistant_tokens"]
    assert two["steps"][-1]["loss"] < two["steps"][0]["loss"]
    # Three validation samples on two ranks: one rank runs a padding forward.
    assert two["val"]["val_loss"] == pytest.approx(one["val"]["val_loss"], rel=1e-4)
    assert two["val"]["val_samples"] == 3


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_vlm_sft_run_on_llava_data_exports_a_loadable_checkpoint(tmp_path):
    """The launcher on LLaVA-format data with images: the loss on the samples falls, the
    validation loss is reported, and the export loads with transformers' Auto classes."""
    data = _llava_fixture(tmp_path / "data")
    out = tmp_path / "outputs"
    cmd = [
        sys.executable, "-m", "gantry.launch", str(ROOT / "datasets" / "llava_json.py"),
        'policy.model_name_or_path="gantry:tiny-qwen2.5-vl"', "policy.model_max_length=512",
        'train.train_policy.type="sft"', "train.train_batch_per_replica=2",
        "train.train_policy.mini_batch=2", "train.epoch=8", 'train.param_dtype="float32"',
        "train.optm_lr=3e-3", f'train.output_dir="{out}"', "validation.enable=true",
        "validation.freq=4", "logging.log_interval=1",
        f'custom.dataset.annotation_path="{data / "train.json"}"',
        f'custom.dataset.val_annotation_path="{data / "train.json"}"',
        "custom.vision.max_pixels=3136",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.name != ".models"]
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["steps"] == 8
    validations = summary["validations"]
    assert [v["step"] for v in validations] == [4, 8]
    assert validations[-1]["val_loss"] < validations[0]["val_loss"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if not m.get("validation")]
    assert steps[-1]["loss"] < steps[0]["loss"] and all(m["tokens_per_s"] > 0 for m in steps)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    export = Path(summary["final_export"])
    processor = AutoProcessor.from_pretrained(export)
    model = AutoModelForImageTextToText.from_pretrained(export)
    image = Image.open(data / "images" / "red.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert torch.isfinite(model(**inputs).logits).all()


SFT_RUN = [
    "--config", "configs/quickstart-sft.toml", "datasets/arithmetic.py", "custom.size=200",
    "train.train_batch_per_replica=16", "train.train_policy.mini_batch=8",
    'train.optm_decay_type="constant"', "train.optm_warmup_steps=0", "validation.enable=false",
    "train.ckpt.enable_checkpoint=true", "train.ckpt.save_freq=2", "train.ckpt.max_keep=-1",
    "logging.log_interval=1",
]  # fmt: skip


def _sft(out: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "gantry.launch", *SFT_RUN, f'train.output_dir="{out}"', *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return run_dir


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_sft_resumes_from_a_checkpoint_to_the_same_losses_and_weights(tmp_path):
    """6 steps in one go == 3 steps, then a run resumed from the step-2 checkpoint: the dataset
    order, the optimizer and the weights carry over exactly."""
    from safetensors.torch import load_file

    whole = _sft(tmp_path / "whole", "train.max_num_steps=6")
    first = _sft(tmp_path / "first", "train.max_num_steps=3")
    resumed = _sft(
        tmp_path / "resumed",
        "train.max_num_steps=6",
        f'train.resume="{first / "checkpoints" / "step_2"}"',
    )

    def losses(run_dir: Path) -> dict[int, float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines)}

    before, after = losses(whole), losses(resumed)
    assert sorted(after) == [3, 4, 5, 6]
    for step in after:
        assert after[step] == pytest.approx(before[step], rel=1e-5), step
    assert losses(first)[3] == pytest.approx(before[3], rel=1e-5)
    expected = load_file(whole / "export" / "final" / "model-00001-of-00001.safetensors")
    got = load_file(resumed / "export" / "final" / "model-00001-of-00001.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert (got[name] - tensor).abs().max() <= 1e-6, name
    result = json.loads((resumed / "result.json").read_text())
    assert result["type"] == "sft" and result["steps"] == 6
    assert result["resumed_from"].endswith("step_2")
