"""Launch-time decisions: dp_shard_size = -1, device fit, and which checkpoint to resume."""

import pytest

from gantry.config import ConfigError, load_config
from gantry.launch.placement import LaunchError, find_resume_checkpoint, resolve_parallelism
from gantry.run import checkpoints


def test_auto_shard_takes_the_gpus_rollouts_leave():
    config = load_config(
        None, ["policy.parallelism.dp_shard_size=-1", "train.train_batch_per_replica=48"]
    )
    assert resolve_parallelism(config, gpus=7).policy.parallelism.dp_shard_size == 6  # 1 rollout
    resolved = resolve_parallelism(
        load_config(None, ["policy.parallelism.dp_shard_size=-1", "train.train_batch_per_replica=48",
                           "policy.parallelism.dp_replicate_size=2"]), gpus=9)  # fmt: skip
    assert resolved.policy.parallelism.dp_shard_size == 4  # (9 - 1 rollout) / 2 copies
    assert resolve_parallelism(config, gpus=0).policy.parallelism.dp_shard_size == 1  # CPU
    sft = load_config(
        None,
        ["policy.parallelism.dp_shard_size=-1", "train.train_batch_per_replica=48",
         'train.train_policy.type="sft"'],
    )  # fmt: skip
    assert resolve_parallelism(sft, gpus=8).policy.parallelism.dp_shard_size == 8  # no rollout


def test_too_many_processes_for_the_gpus():
    config = load_config(None, ["policy.parallelism.dp_shard_size=8"])
    with pytest.raises(LaunchError, match="needs 8 policy GPUs .* \\+ 1 rollout GPUs .* has 8"):
        resolve_parallelism(config, gpus=8)
    assert resolve_parallelism(config, gpus=0).policy.parallelism.dp_shard_size == 8  # CPU: fine


def test_resolved_shard_must_divide_the_batch():
    config = load_config(
        None, ["policy.parallelism.dp_shard_size=-1", "train.train_batch_per_replica=40"]
    )
    with pytest.raises(ConfigError, match="divisible by the ranks of a policy replica"):
        resolve_parallelism(config, gpus=4)  # 3 ranks


def _checkpoint(run, step, complete=True):
    path = checkpoints.step_dir(run / checkpoints.CHECKPOINTS, step)
    (path / "policy").mkdir(parents=True)
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    assert find_resume_checkpoint(False, tmp_path) is None
    assert find_resume_checkpoint(True, tmp_path) is None  # nothing yet: start afresh
    old = _checkpoint(tmp_path / "run-a", 10)
    newer = _checkpoint(tmp_path / "run-b", 4)
    _checkpoint(tmp_path / "run-b", 6, complete=False)  # half-written: never picked
    assert find_resume_checkpoint(True, tmp_path) == newer
    assert find_resume_checkpoint(str(tmp_path / "run-a"), tmp_path) == old.resolve()
    assert find_resume_checkpoint(str(newer), tmp_path) == newer.resolve()
    with pytest.raises(LaunchError, match="not a complete checkpoint"):
        find_resume_checkpoint(str(tmp_path / "run-b/checkpoints/step_6"), tmp_path)
    with pytest.raises(LaunchError, match="no complete checkpoint in"):
        find_resume_checkpoint(str(tmp_path / "nowhere"), tmp_path)


def test_pruning_keeps_complete_checkpoints_and_paths_in_use(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)  # an abandoned save
    _checkpoint(tmp_path, 10, complete=False)  # maybe in progress
    deleted = checkpoints.prune_step_dirs(root, 2, complete_only=True, keep_paths={root / "step_4"})
    assert [p.name for p in deleted] == ["step_2", "step_5"]
    assert [p.name for p in checkpoints.step_dirs(root)] == [
        "step_4",
        "step_6",
        "step_8",
        "step_10",
    ]
    assert checkpoints.latest_complete(root).name == "step_8"


def test_rollout_dtype_auto_follows_the_device_and_the_model(tmp_path):
    import json

    from gantry.launch.placement import rollout_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert rollout_dtype("auto", tmp_path, on_gpu=False) == "float32"
    assert rollout_dtype("auto", tmp_path, on_gpu=True) == "bfloat16"  # not float32 on a GPU
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"dtype": "float16"}}))
    assert rollout_dtype("auto", tmp_path, on_gpu=True) == "float16"  # a VLM's text model
    assert rollout_dtype("bfloat16", tmp_path, on_gpu=False) == "bfloat16"  # explicit wins


@pytest.mark.parametrize(
    "override, key",
    [('rollout.dtype="int8"', "rollout.dtype"), ("rollout.weight_sync_timeout=0.0", "rollout.weight_sync_timeout"),
     ("rollout.parallelism.tp_size=0", "rollout.parallelism.tp_size")],
)  # fmt: skip
def test_bad_rollout_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
