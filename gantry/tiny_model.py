"""The embedded default model: a tiny Qwen2 and a byte-level BPE tokenizer, made locally.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` library on a small
synthetic corpus, using the normaliser and split pattern of Qwen2 so that `AutoTokenizer`
(which returns `Qwen2Tokenizer` for a qwen2 config) gives the same ids as the trained object.
The result is a normal Hugging Face directory, loaded through the same `from_pretrained`
path as a real checkpoint.

Run `python -m gantry.tiny_model DIR` to write one.
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
# Version of the recipe below: a directory built by an older recipe is rebuilt, not reused.
RECIPE_VERSION = 2


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
    (path / "gantry_tiny_model.json").write_text(json.dumps({"recipe_version": RECIPE_VERSION}))
    return path


def ensure_tiny_model(path: str | Path, **kwargs) -> Path:
    """Build the tiny model at `path` unless a directory from the current recipe is there."""
    path = Path(path)
    marker = path / "gantry_tiny_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe_version") == RECIPE_VERSION:
        return path
    return build_tiny_model(path, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the model and tokenizer to")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    args = parser.parse_args()
    out = build_tiny_model(
        args.path,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    print(out)


if __name__ == "__main__":
    main()
