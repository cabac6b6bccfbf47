"""Launch-time checks of the config against the model it trains, before any worker starts.

The launcher resolves `policy.model_name_or_path` to a directory (a built-in tiny model is
built there) and calls `check_model_fits(config, model_path)`: it reads the model's
config.json as plain JSON (no torch, no transformers) and raises LaunchError, one line naming
the keys and their values, for settings the model contradicts, which would otherwise fail only
once vLLM or the trainer starts:
- `policy.model_max_length` above the positions the model has (max_position_embeddings, times
  its RoPE scaling factor where that extends it, as vLLM counts them);
- GRPO: `rollout.parallelism.tp_size` not dividing the model's attention heads (vLLM shards them).
A model written as a local path must be a directory. A Hugging Face repo id is checked from the
local Hub cache when its config.json is there, never
downloaded here; otherwise the check is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gantry.config import GantryConfig
from gantry.launch.placement import LaunchError

# Keys under which configs give their context length (vLLM reads the same, takes the least).
LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose scaling factor does not extend the context (vLLM's exceptions).
UNSCALED_ROPE = {"default", "mrope", "su", "longrope", "llama3"}


def read_model_config(model_path: str) -> dict[str, Any] | None:
    """The model's config.json (a local directory, or a repo id found in the local Hub cache),
    or None when it is not on this machine."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        file = local / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_path, "config.json")
    except ValueError:  # not a valid repo id: the loader will say so when it starts
        return None
    if not isinstance(cached, str):
        return None
    return json.loads(Path(cached).read_text(encoding="utf-8"))


def text_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: a VLM keeps them in text_config (or llm_config)."""
    for key in ("text_config", "llm_config"):
        inner = model_config.get(key)
        if isinstance(inner, dict) and any(k in inner for k in LENGTH_KEYS):
            return inner
    return model_config


def max_positions(model_config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes, as vLLM derives it (None when unstated)."""
    text = text_config(model_config)
    lengths = [text[k] for k in LENGTH_KEYS if isinstance(text.get(k), int)]
    if not lengths:
        return None
    limit = min(lengths)
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if kind not in UNSCALED_ROPE and isinstance(factor, int | float) and factor > 1:
        if kind == "yarn":
            limit = rope.get("original_max_position_embeddings", limit)
        limit = int(limit * factor)
    return limit


def check_model_exists(model_path: str) -> None:
    """LaunchError when `model_path` is written as a local path (absolute, ./, ../, ~, or more
    than one `/`, which no Hub repo id has) and no directory is there: every worker would fail
    loading it, and a restart would not help."""
    local = Path(model_path).expanduser()
    path_like = model_path.startswith(("/", "./", "../", "~")) or model_path.count("/") > 1
    if path_like and not local.is_dir():
        raise LaunchError(
            f"policy.model_name_or_path = {model_path!r}: no directory there; give the path of "
            "a Hugging Face model directory, a Hub repo id (org/name) or a built-in gantry: model"
        )


def check_model_fits(config: GantryConfig, model_path: str) -> None:
    """LaunchError naming the keys and values when the config asks what the model cannot do."""
    model_config = read_model_config(model_path)
    if model_config is None:
        return
    where = f"the model at {model_path}"
    length, limit = config.policy.model_max_length, max_positions(model_config)
    if limit is not None and length > limit:
        raise LaunchError(
            f"policy.model_max_length = {length} is above {where}'s {limit} positions "
            f"(max_position_embeddings in its config.json): set policy.model_max_length <= {limit}"
        )
    heads = text_config(model_config).get("num_attention_heads")
    tp = config.rollout.parallelism.tp_size
    grpo = config.train.train_policy.type == "grpo"
    if grpo and isinstance(heads, int) and heads % tp:
        raise LaunchError(
            f"rollout.parallelism.tp_size = {tp} does not divide {where}'s "
            f"num_attention_heads = {heads}: use a tp_size that divides {heads}"
        )
