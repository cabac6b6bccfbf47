"""Export of the policy as a Hugging Face directory: sharded safetensors, index, config, tokenizer.

The directory is written under a temporary name and renamed when complete, so a crash never
leaves a half-written export where a complete one is expected. It loads with
`AutoModelForCausalLM.from_pretrained` (and vLLM).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedModel

SHARD_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def export_hf(
    model: PreTrainedModel,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write `model`'s weights, config and the tokenizer from `tokenizer_dir` to `out_dir`."""
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    state = _exportable_state(model)
    write_sharded_safetensors(state, tmp_dir, max_shard_size=max_shard_size)
    model.config.save_pretrained(tmp_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return out_dir


def _exportable_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors sharing memory; transformers re-ties lm_head on load.
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def write_sharded_safetensors(
    state: dict[str, torch.Tensor], out_dir: Path, *, max_shard_size: int | str
) -> None:
    """Shards named like transformers' and an index, written even when there is one shard."""
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size
    )
    filenames = {}
    total = len(split.filename_to_tensors)
    for name, tensor_names in sorted(split.filename_to_tensors.items()):
        # One shard is named model.safetensors by the splitter; keep the sharded form always.
        filename = name if split.is_sharded else f"model-00001-of-{total:05d}.safetensors"
        shard = {t: state[t] for t in tensor_names}
        save_file(shard, out_dir / filename, metadata={"format": "pt"})
        filenames.update({t: filename for t in tensor_names})
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(filenames.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def prune_exports(export_root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest `step_N` exports (-1 keeps all); returns the deleted."""
    if keep < 0:
        return []
    steps = sorted(
        (p for p in export_root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    doomed = steps[: max(0, len(steps) - keep)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
