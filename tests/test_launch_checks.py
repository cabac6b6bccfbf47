"""Launch-time checks of a config against its model's config.json: every shipped config fits
the built-in model it runs on; a model_max_length beyond the model's positions, or a rollout TP
size that does not divide its heads, is refused naming the keys and values (exit 2 at launch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gantry.config import load_config
from gantry.launch.checks import check_model_fits, max_positions, read_model_config
from gantry.launch.placement import LaunchError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_there_are_configs_to_check():
    assert {"quickstart-grpo.toml", "vlm-sft-llava.toml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_fits_its_built_in_model(path, tiny_llm, tiny_vlm):
    shipped = load_config(path, [])
    if shipped.policy.model_name_or_path.startswith("gantry:"):
        builtin = tiny_vlm if "vl" in shipped.policy.model_name_or_path else tiny_llm
    else:  # a recipe for a real model, tried on CPU with the built-in of its kind
        builtin = tiny_vlm if path.name.startswith("vlm-") else tiny_llm
    config = load_config(path, [f"policy.model_name_or_path={builtin}"])
    check_model_fits(config, str(builtin))
    check_model_fits(shipped, shipped.policy.model_name_or_path)  # skipped unless local


def test_a_model_max_length_beyond_the_model_is_refused_naming_both(tiny_vlm):
    path = ROOT / "configs/vlm-sft-llava.toml"
    config = load_config(path, [f"policy.model_name_or_path={tiny_vlm}"])
    assert max_positions(read_model_config(str(tiny_vlm))) == 4096  # from text_config
    config.policy.model_max_length = 8192
    with pytest.raises(LaunchError) as caught:
        check_model_fits(config, str(tiny_vlm))
    message = str(caught.value)
    assert "policy.model_max_length = 8192" in message and "4096" in message
    assert "\n" not in message


def test_a_rollout_tp_size_that_does_not_divide_the_heads_is_refused(tiny_llm):
    config = load_config(ROOT / "configs/quickstart-grpo.toml", [])
    config.rollout.parallelism.tp_size = 3  # the tiny model has 2 heads
    with pytest.raises(LaunchError, match=r"tp_size = 3 .*num_attention_heads = 2"):
        check_model_fits(config, str(tiny_llm))


def test_rope_scaling_extends_the_positions_as_vllm_counts_them(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    base = {"max_position_embeddings": 32768}
    assert max_positions({**base, "rope_scaling": yarn}) == 131072
    assert max_positions({**base, "rope_scaling": {"type": "mrope", "factor": 2}}) == 32768
    assert max_positions({"text_config": {"max_position_embeddings": 128000}}) == 128000
    assert max_positions({"hidden_size": 8}) is None
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    config = load_config(ROOT / "configs/quickstart-sft.toml", [])
    with pytest.raises(LaunchError, match="policy.model_max_length = 512 .* 64 positions"):
        check_model_fits(config, str(tmp_path))


def test_a_model_not_on_this_machine_is_not_checked(tmp_path):
    assert read_model_config("no-such-org/no-such-model") is None
    assert read_model_config(str(tmp_path / "not/a/model")) is None
    assert read_model_config(str(tmp_path)) is None  # a directory without config.json


def test_the_checks_import_no_torch():
    import subprocess

    code = "import sys, gantry.launch.checks; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "False"
