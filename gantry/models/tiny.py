"""The embedded default models: a tiny Qwen2 (and a tiny Qwen2.5-VL) with a BPE tokenizer, made locally.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` library on a small
synthetic corpus, using the normaliser and split pattern of Qwen2 so that `AutoTokenizer`
(which returns `Qwen2Tokenizer` for a qwen2 config) gives the same ids as the trained object.
The result is a normal Hugging Face directory, loaded through the same `from_pretrained`
path as a real checkpoint.

The tiny Qwen2.5-VL shares the tokenizer (plus Qwen's vision tokens) and saves a
`Qwen2_5_VLProcessor` with it, so `AutoProcessor` / `AutoModelForImageTextToText` load it.
`BUILTIN_MODELS` maps the built-in names (`gantry:tiny-qwen2`, ...) to their `ensure_*` builders.

Run `python -m gantry.models.tiny DIR` to write the text model, `... DIR --vlm` for the VLM.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Chat template of the tiny VLM: content is a string or a list of text/image/video parts.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Versions of the recipes below: a directory built by an older recipe is rebuilt, not reused.
RECIPE_VERSION = 2
VLM_RECIPE_VERSION = 1
MARKER = "gantry_tiny_model.json"


def _corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Synthetic text with the words, digits and punctuation the example tasks use."""
    rng = random.Random(seed)
    words = [
        "what",
        "is",
        "the",
        "sum",
        "of",
        "and",
        "answer",
        "reply",
        "with",
        "only",
        "a",
        "number",
        "digit",
        "plus",
        "minus",
        "equals",
        "system",
        "user",
        "assistant",
        "you",
        "are",
        "helpful",
        "question",
        "count",
        "letters",
        "word",
        "in",
        "sort",
        "reverse",
        "copy",
        "the",
        "following",
        "text",
        "please",
        "think",
        "step",
        "by",
        "step",
        "final",
    ]
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        out.append(f"{sentence.capitalize()}? {a} + {b} = {a + b}. The answer is {a + b}.")
    return out


def build_tokenizer(vocab_size: int = 512):
    """Train a Qwen2-style byte-level BPE tokenizer; returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny Qwen2 causal LM (random weights) and its tokenizer to `path`.

    head_dim is 64 because vLLM's CPU attention needs head_dim >= 32.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    _write_marker(path, "qwen2", RECIPE_VERSION)
    return path


def _write_marker(path: Path, kind: str, version: int) -> None:
    (path / MARKER).write_text(json.dumps({"recipe_version": version, "kind": kind}))


def _is_current(path: Path, kind: str, version: int) -> bool:
    """True when `path` holds a model of `kind` from recipe `version` (no kind: an old qwen2)."""
    marker = path / MARKER
    if not marker.exists():
        return False
    recipe = json.loads(marker.read_text())
    return recipe.get("recipe_version") == version and recipe.get("kind", "qwen2") == kind


def build_vlm_processor(path: str | Path):
    """Write a `Qwen2_5_VLProcessor` (tokenizer with vision tokens) to `path`; returns it.

    Pixel limits are small (4 to 256 merged 28x28 patches per image or frame) to keep tests fast.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 256}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=VLM_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return processor


def _vlm_config(tokenizer, hidden_size: int, num_layers: int):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS + SPECIAL_TOKENS}
    head_dim = 64  # vLLM's CPU attention needs head_dim >= 32; mrope sections sum to head_dim / 2
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=hidden_size // head_dim,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
        tie_word_embeddings=False,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[1],
        window_size=56,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_vlm(
    path: str | Path, *, hidden_size: int = 128, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny Qwen2.5-VL (random float32 weights) and its processor to `path`."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_vlm_processor(path).tokenizer
    config = _vlm_config(tokenizer, hidden_size, num_layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(path)
    _write_marker(path, "qwen2.5-vl", VLM_RECIPE_VERSION)
    return path


def ensure_tiny_vlm(path: str | Path, **kwargs) -> Path:
    """Build the tiny Qwen2.5-VL at `path` unless a directory from the current recipe is there."""
    path = Path(path)
    if _is_current(path, "qwen2.5-vl", VLM_RECIPE_VERSION):
        return path
    return build_tiny_vlm(path, **kwargs)


def ensure_tiny_model(path: str | Path, kind: str = "qwen2", **kwargs) -> Path:
    """Build the tiny model of `kind` ("qwen2" or "qwen2.5-vl") at `path` unless it is current."""
    if kind == "qwen2.5-vl":
        return ensure_tiny_vlm(path, **kwargs)
    if kind != "qwen2":
        raise ValueError(f"unknown tiny model kind {kind!r}; use 'qwen2' or 'qwen2.5-vl'")
    path = Path(path)
    if _is_current(path, "qwen2", RECIPE_VERSION):
        return path
    return build_tiny_model(path, **kwargs)


# Built-in model names (`policy.model_name_or_path = "gantry:..."`) -> builder(path) -> Path.
BUILTIN_MODELS = {
    "gantry:tiny-qwen2": ensure_tiny_model,
    "gantry:tiny-qwen2.5-vl": ensure_tiny_vlm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the model and tokenizer to")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--vlm", action="store_true", help="write the tiny Qwen2.5-VL instead")
    args = parser.parse_args()
    if args.vlm:
        print(build_tiny_vlm(args.path, hidden_size=args.hidden_size, num_layers=args.num_layers))
        return
    out = build_tiny_model(
        args.path,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    print(out)


if __name__ == "__main__":
    main()
