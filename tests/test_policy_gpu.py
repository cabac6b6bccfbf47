"""The policy step on a GPU (NCCL): bfloat16 compute and CPU offload give the step of plain
float32 FSDP2. Skipped on machines without CUDA."""

import pytest
import torch

from tests.test_policy_parallel import _run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.dist,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_offload_and_bfloat16_on_gpu(tmp_path, tiny_model_dir):
    nproc = min(2, torch.cuda.device_count())
    shard = [f"policy.parallelism.dp_shard_size={nproc}", "train.train_policy.mini_batch=4"]
    plain, plain_w = _run(tmp_path, tiny_model_dir, "plain", nproc, *shard)
    offload, offload_w = _run(
        tmp_path, tiny_model_dir, "offload", nproc, *shard, "train.fsdp_offload=true"
    )
    for a, b in zip(plain, offload, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    for key, value in plain_w.items():
        torch.testing.assert_close(offload_w[key], value, atol=1e-4, rtol=1e-3)
    mixed, _ = _run(tmp_path, tiny_model_dir, "bf16", nproc, *shard, 'train.param_dtype="bfloat16"')
    for a, b in zip(plain, mixed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=5e-3)
