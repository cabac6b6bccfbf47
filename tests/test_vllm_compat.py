"""The vLLM internals Gantry uses (`rollout.vllm_compat`): all there in the installed vLLM, and a
missing one stops the engine before it starts, with the vLLM version and the missing name.

No engine starts here (the checks of a running engine's workers are in tests/test_engines.py);
importing vLLM takes ~8 s on the 2-core machines, hence `slow`; vLLM is imported by the tests,
not at collection, so that the inner loop (`-m "not slow"`) never pays for it."""

from types import SimpleNamespace

import pytest
import torch

from rollout import vllm_compat
from rollout.vllm_compat import VLLMInternalsMissing, check_vllm, missing_in_worker

pytestmark = pytest.mark.slow

# What VLLMEngine passes on the CPU build, the largest set.
ENGINE_ARGS = [
    "logprobs_mode",
    "worker_extension_cls",
    "enable_chunked_prefill",
    "max_num_batched_tokens",
    "kv_cache_memory_bytes",
]


def test_the_installed_vllm_has_every_internal_gantry_uses():
    assert vllm_compat.missing_in_vllm(ENGINE_ARGS) == []
    check_vllm(ENGINE_ARGS)


def raised_by_check(engine_args=ENGINE_ARGS) -> VLLMInternalsMissing:
    with pytest.raises(VLLMInternalsMissing) as raised:
        check_vllm(engine_args)
    import vllm

    assert f"vLLM {vllm.__version__} lacks" in str(raised.value)
    return raised.value


def test_a_missing_module_name_is_named_with_the_version(monkeypatch):
    import vllm.model_executor.model_loader.reload as reload

    monkeypatch.delattr(reload, "finalize_layerwise_reload")
    error = raised_by_check()
    assert error.missing == ["vllm.model_executor.model_loader.reload.finalize_layerwise_reload"]
    assert "vllm.model_executor.model_loader.reload.finalize_layerwise_reload" in str(error)


def test_a_missing_method_of_the_engine_is_named(monkeypatch):
    from vllm.v1.engine.llm_engine import LLMEngine

    monkeypatch.delattr(LLMEngine, "reset_encoder_cache")
    error = raised_by_check()
    assert error.missing == ["vllm.v1.engine.llm_engine.LLMEngine.reset_encoder_cache"]


def test_a_missing_environment_variable_and_engine_argument_are_named(monkeypatch):
    import vllm.envs as envs

    monkeypatch.delitem(envs.environment_variables, "VLLM_ENABLE_V1_MULTIPROCESSING")
    error = raised_by_check([*ENGINE_ARGS, "no_such_argument"])
    assert error.missing == [
        "environment variable VLLM_ENABLE_V1_MULTIPROCESSING",
        "vllm.engine.arg_utils.EngineArgs.no_such_argument",
    ]


def test_a_worker_that_cannot_reset_a_cache_is_reported():
    """Every cache a weight update leaves stale must be resettable: none is optional."""

    class RunnerWithoutMultimodalCache:
        def get_model(self):
            return torch.nn.Linear(2, 2)  # not a vLLM model: it has no load_weights either

        def reset_lora_state(self):
            pass

        def reset_encoder_cache(self):
            pass

    worker = SimpleNamespace(
        model_runner=RunnerWithoutMultimodalCache(),
        vllm_config=SimpleNamespace(model_config=None),
        device=torch.device("cpu"),
    )
    assert missing_in_worker(worker) == ["model_runner.reset_mm_cache", "model.load_weights"]
    assert missing_in_worker(SimpleNamespace(model_runner=None)) == [
        "worker.vllm_config",
        "worker.device",
    ]
