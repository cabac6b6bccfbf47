"""Which transformers class loads a checkpoint: causal LMs and vision-language models alike.

A Qwen2.5-VL checkpoint is not an `AutoModelForCausalLM` (transformers maps it to
`AutoModelForImageTextToText`); both kinds produce next-token logits from `input_ids`, and a VLM
also takes `pixel_values` / `image_grid_thw` (images) and `pixel_values_videos` /
`video_grid_thw` (videos). Policy and rollout pick the class here, so both load a checkpoint the
same way.
"""

from __future__ import annotations

from typing import Any


def is_vision_language(config: Any) -> bool:
    """True for a config with a vision tower (Qwen2-VL, Qwen2.5-VL, ...)."""
    return getattr(config, "vision_config", None) is not None


def media_token_ids(config: Any) -> list[int]:
    """A VLM's image / video placeholder and delimiter tokens. Samplers never emit them (a
    generated placeholder would need pixels the prompt does not have) and the policy computes
    log-probs without them, so the two distributions stay the same."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    if not is_vision_language(config):
        return []
    return sorted({getattr(config, n) for n in names if getattr(config, n, None) is not None})


def auto_model_class(config: Any):
    """The transformers Auto class that builds a model for `config`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def load_text_front_end(model_path: str, vision: bool):
    """(processor, tokenizer) of a checkpoint: a VLM's processor (image processor + tokenizer +
    chat template) and its tokenizer, or (None, the tokenizer) for a text model."""
    from transformers import AutoProcessor, AutoTokenizer

    if vision:
        processor = AutoProcessor.from_pretrained(model_path)
        return processor, processor.tokenizer
    return None, AutoTokenizer.from_pretrained(model_path)


def load_pretrained(model_path: str, **kwargs):
    """`from_pretrained` with the class that fits the checkpoint's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return auto_model_class(config).from_pretrained(model_path, **kwargs)
