"""The safetensors export loads with transformers and gives the trained model's logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy.export import INDEX_NAME, export_hf, prune_exports


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip(tmp_path, tiny_model_dir, tiny_tied_model_dir, tied):
    source = tiny_tied_model_dir if tied else tiny_model_dir
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():  # "train" it: the export must carry the new weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = export_hf(model, source, tmp_path / "export", max_shard_size=200_000)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not (out.parent / "export.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert (
        AutoTokenizer.from_pretrained(out)("1 + 2")["input_ids"]
        == AutoTokenizer.from_pretrained(source)("1 + 2")["input_ids"]
    )


def test_single_shard_export_still_has_an_index(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = export_hf(model, tiny_model_dir, tmp_path / "one")
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    AutoModelForCausalLM.from_pretrained(out)


def test_prune_keeps_the_newest_step_exports(tmp_path):
    for step in (2, 10, 4, 8):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / "final").mkdir()
    deleted = prune_exports(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["step_2", "step_4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step_10", "step_8"]
    assert prune_exports(tmp_path, keep=-1) == []
