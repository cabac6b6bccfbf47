"""The vLLM rollout engine: generation, in-place weight updates and weight read-back.

This module owns `VLLMEngine` (a `rollout.engine.RolloutEngine` on `vllm.LLM`) and
`WeightSyncExtension`, the worker extension vLLM mixes into each of its workers so the engine
can reach the model wherever the workers run: in this process (CPU build, in-process engine),
or in vLLM's own engine-core and tensor-parallel worker processes (CUDA build).

Conventions (shared with `rollout.hf_engine.HFEngine`):

- `Completion.token_ids` end with the EOS / stop token that ended them ("stop"), or stop at
  `max_tokens` ("length").
- Log-probs come from vLLM's `logprobs_mode="processed_logprobs"`: the log-softmax of the
  logits after penalties, temperature and top-k / top-p, i.e. of the distribution each token
  was drawn from. With top_p 1, top_k off and no repetition penalty that is exactly
  `log_softmax(logits / temperature)`, what the policy recomputes (vLLM's default,
  "raw_logprobs", would ignore the temperature).
- With `sampling.seed` set, prompt i gets the request seed `seed + i * n`; vLLM gives its j-th
  sample `seed + i * n + j`, so every sample of a batch has its own seed.

A weight sync reaches every worker directly: `gantry_receive_weights` runs in each TP worker,
which joins the sync's process groups (`gantry.comm.weights`) and loads each bucket as it
arrives. Weights handed over by the caller (`load_weights`, for tests and tools) go through
the worker extension in three RPCs (begin, chunks, finish) around
vLLM's layerwise reload: `model.load_weights` alone fails on the CPU build, whose linear
layers repack their weights into kernel-specific buffers and empty the originals. Tensors are
passed as they are in-process; across processes (RPC arguments are msgpack-encoded, so a bare
tensor arrives as a list) CPU tensors travel as `torch.save` bytes and CUDA tensors as CUDA
IPC handles.

vLLM's internals (everything but `LLM`, `SamplingParams` and `vllm.inputs`) are reached only
through `rollout.vllm_compat`, which checks at engine start that all of them exist.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from gantry.comm.protocol import SyncPlan
from gantry.comm.sync_groups import SyncCancelled
from gantry.comm.weights import WeightReceiver
from rollout import vllm_compat
from rollout.engine import Completion, EnginePrompt, MultimodalPrompt, SamplingSettings
from rollout.vllm_compat import GatherSpec

# Default KV-cache size on the CPU build: there `gpu_memory_utilization` means "fraction of
# host memory", and vLLM refuses to start when that much is not free at start-up.
CPU_KV_CACHE_BYTES = 1 << 30
# Bytes of weights per RPC when tensors must be serialised to reach the workers.
CHUNK_BYTES = 256 << 20
EXTENSION = "rollout.vllm_engine.WeightSyncExtension"


class VLLMEngine:
    """A `RolloutEngine` on vLLM; CPU build in-process, CUDA build with vLLM's executors."""

    def __init__(
        self,
        model_path: str,
        *,
        tp_size: int = 1,
        gpu_memory_utilization: float = 0.8,
        max_model_len: int,
        seed: int = 0,
        enforce_eager: bool | None = None,
        dtype: str = "auto",
        kv_cache_memory_bytes: int | None = None,
    ) -> None:
        on_cuda = torch.cuda.is_available()
        if not on_cuda:
            if tp_size > 1:
                # vLLM binds each CPU worker to a NUMA node and refuses more workers than
                # nodes; cores split among the workers work on any machine.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tp_size))
            # In-process engine core: ~2 s start-up instead of ~18 s, and tensors reach the
            # worker as they are. vLLM reads this variable lazily, at engine start.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
            # vLLM's "auto" turns a float32 checkpoint into bfloat16, which CPUs without
            # AVX512-BF16/AMX run slower than float32, and which costs ~5e-3 in log-probs
            # against a float32 policy.
            if dtype == "auto":
                dtype = "float32"
        from vllm import LLM

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process;
        # close() puts it back.
        self._set_num_threads = torch.set_num_threads
        kwargs: dict[str, Any] = {}
        if not on_cuda:
            # vLLM's CPU build crashes ("CPU Generator does not use offset") when the prefill
            # of a request with its own seed is split over steps; without chunked prefill a
            # prompt waits for a step with room instead, as vLLM itself does for MLA on CPU.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 8192)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        # Engine arguments newer than vLLM's first releases: checked with the internals.
        vllm_compat.check_vllm(["logprobs_mode", "worker_extension_cls", *kwargs])
        self._llm = LLM(
            model=str(model_path),
            tensor_parallel_size=tp_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            # CUDA graphs pay off on GPU; on CPU there is nothing to capture.
            enforce_eager=(not on_cuda) if enforce_eager is None else enforce_eager,
            dtype=dtype,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            **kwargs,
        )
        vllm_compat.check_engine(self._llm)
        self.tp_size = tp_size
        self.in_process = _engine_in_process(tp_size)

    def generate(
        self, prompts: list[EnginePrompt], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        from vllm.inputs import TextPrompt, TokensPrompt

        if not prompts:
            return []
        requests = [
            TextPrompt(prompt=p.text, multi_modal_data=p.media.vllm_multi_modal_data())
            if isinstance(p, MultimodalPrompt)
            else TokensPrompt(prompt_token_ids=list(p))
            for p in prompts
        ]
        banned = self._token_texts(sampling.banned_token_ids)
        params = [_sampling_params(sampling, i, banned) for i in range(len(prompts))]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outputs, strict=True):
            seen = list(out.prompt_token_ids) if isinstance(prompt, MultimodalPrompt) else None
            ordered = sorted(out.outputs, key=lambda c: c.index)
            results.append([_completion(c, seen) for c in ordered])
        return results

    def _token_texts(self, token_ids: list[int]) -> list[str]:
        if not token_ids:
            return []
        return self._llm.get_tokenizer().convert_ids_to_tokens(list(token_ids))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (HF name, tensor) pairs in place, in every worker.

        Give each fused module (q/k/v, gate/up) all of its parts in one call: the layerwise
        reload processes a layer once all of its parameters arrived, and a layer left
        incomplete at the end is processed with the missing parts uninitialised. For the same
        reason, if `weights` fails part-way the engine needs a complete load before it is
        used again.
        """
        rpc = self._llm.collective_rpc
        rpc("gantry_begin_load")
        try:
            for payload in self._payloads(weights):
                rpc("gantry_load_chunk", args=(payload,))
        finally:
            rpc("gantry_finish_load")
        self._forget_cached_prefixes()

    def receive_weights(self, plan: SyncPlan, manifest: str, version: int, replica: str) -> None:
        """Every TP worker joins the sync and loads the broadcast weights as they arrive.
        SyncCancelled if the controller called the sync off (raised here, in this process:
        vLLM's engine-core process would turn it into a bare Exception)."""
        answers = self._llm.collective_rpc(
            "gantry_receive_weights", args=(plan.model_dump(), manifest, version, replica)
        )
        # Also when called off: the workers may hold part of the new weights by then.
        self._forget_cached_prefixes()
        reasons = [reason for reason in answers if reason is not None]
        if reasons:
            raise SyncCancelled(reasons[0])

    def _forget_cached_prefixes(self) -> None:
        vllm_compat.reset_engine_caches(self._llm)

    def _payloads(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple]:
        if self.in_process:
            # Same process: the worker consumes the iterator lazily, one bucket at a time.
            yield ("inline", weights)
            return
        for chunk in _chunks(weights, CHUNK_BYTES):
            yield encode_chunk(chunk)

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The weights the engine computes with, under HF names, gathered over TP ranks.

        Fused modules are split back (qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj,
        from the model's `packed_modules_mapping`); vocab padding is cut off. Other names are
        vLLM's, equal to HF's for Llama/Qwen2-style models; architectures that rename
        checkpoint keys (`hf_to_vllm_mapper`) keep vLLM's names.
        """
        results = self._llm.collective_rpc("gantry_read_weights", args=(not self.in_process,))
        return gather_ranks([decode_read(result) for result in results])

    def close(self) -> None:
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        vllm_compat.shutdown_engine_core(llm)
        del llm
        gc.collect()
        vllm_compat.cleanup_distributed()
        torch.set_num_threads = self._set_num_threads


def cpu_binding(tp_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each of `tp_size` CPU workers its share of the cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp_size:
        return "nobind"
    share = len(cores) // tp_size
    return "|".join(
        ",".join(str(c) for c in cores[i * share : (i + 1) * share]) for i in range(tp_size)
    )


def _engine_in_process(tp_size: int) -> bool:
    """Whether the (only) worker runs in this process, so RPC arguments are not serialised."""
    return tp_size == 1 and not vllm_compat.multiprocessing_enabled()


def _sampling_params(sampling: SamplingSettings, index: int, banned: list[str] | None = None):
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=sampling.max_tokens,
        seed=None if sampling.seed is None else sampling.seed + index * sampling.n,
        stop_token_ids=list(sampling.stop_token_ids),
        logprobs=0,  # only the sampled token's
        detokenize=False,  # the rollout worker decodes what it needs
        # Special tokens: each is one token id, masked before the log-probs are taken.
        bad_words=banned or None,
    )


def _completion(output, prompt_token_ids: list[int] | None = None) -> Completion:
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={output.finish_reason!r}")
    token_ids = list(output.token_ids)
    logprobs = [step[token].logprob for token, step in zip(token_ids, output.logprobs, strict=True)]
    return Completion(token_ids, logprobs, output.finish_reason, prompt_token_ids)


# ---------------------------------------------------------------------------------------------
# Moving weights between processes


def _chunks(
    weights: Iterable[tuple[str, torch.Tensor]], limit: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    chunk, size = [], 0
    for name, tensor in weights:
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_chunk(chunk: list[tuple[str, torch.Tensor]]) -> tuple[str, bytes]:
    """A chunk of weights as bytes that survive vLLM's msgpack RPC to another process."""
    if chunk and all(t.is_cuda for _, t in chunk):
        from torch.multiprocessing.reductions import reduce_tensor

        # The handles point at our memory: it must hold the finished values before the
        # worker reads it, and stays alive until the (synchronous) RPC has returned.
        torch.cuda.current_stream().synchronize()
        handles = [(name, reduce_tensor(t.detach())) for name, t in chunk]
        return ("cuda_ipc", pickle.dumps(handles))
    buffer = io.BytesIO()
    torch.save([(name, t.detach().cpu()) for name, t in chunk], buffer)
    return ("torch", buffer.getvalue())


def decode_chunk(payload: tuple, device: torch.device) -> Iterable[tuple[str, torch.Tensor]]:
    kind, data = payload
    if kind == "inline":
        return data
    if kind == "torch":
        return torch.load(io.BytesIO(data), weights_only=True)
    if kind == "cuda_ipc":
        # Copy out of the sender's memory: the layerwise reload may hold a tensor past this
        # RPC (until the rest of its layer arrives), when the sender may have freed it.
        out = []
        for name, (rebuild, args) in pickle.loads(data):
            out.append((name, rebuild(*args).to(device, copy=True)))
        return out
    raise ValueError(f"unknown weight payload kind {kind!r}")


def decode_read(result: tuple) -> dict[str, tuple[torch.Tensor, GatherSpec]]:
    """One worker's answer to `gantry_read_weights`: tensors inline or as `torch.save` bytes."""
    specs, tensors = result
    if isinstance(tensors, bytes):
        tensors = torch.load(io.BytesIO(tensors), weights_only=True)
    return {name: (tensors[name], tuple(spec)) for name, spec in specs.items()}


def gather_ranks(
    per_rank: list[dict[str, tuple[torch.Tensor, GatherSpec]]],
) -> dict[str, torch.Tensor]:
    """Join the tensor-parallel shards of each weight (ranks in order) into the full tensor."""
    out = {}
    for name, (tensor, (dim, stride, keep)) in per_rank[0].items():
        if dim is not None and len(per_rank) > 1:
            tensor = torch.cat([rank[name][0] for rank in per_rank[::stride]], dim=dim)
        if keep is not None:
            tensor = tensor[:keep]
        out[name] = tensor.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Inside the workers


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs in every worker.

    Methods are prefixed `gantry_` so they cannot collide with the worker's own.
    """

    def gantry_check_worker(self) -> list[str]:
        """The vLLM internals this worker lacks (`vllm_compat.missing_in_worker`)."""
        return vllm_compat.missing_in_worker(self)

    def gantry_begin_load(self) -> None:
        with vllm_compat.current_vllm_config(self):
            vllm_compat.begin_layerwise_reload(self.model_runner.get_model())

    def gantry_load_chunk(self, payload: tuple) -> None:
        self._gantry_load(decode_chunk(payload, self.device))

    def _gantry_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        with vllm_compat.current_vllm_config(self), torch.no_grad():
            self.model_runner.get_model().load_weights(weights)

    def _gantry_load_bucket(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load one received bucket, whose tensors view a buffer reused for a later bucket.
        The layerwise reload keeps the tensors of a layer it cannot process yet (a padded
        vocabulary is never "complete" until the end): those are copied out."""
        self._gantry_load(weights)
        storages = {tensor.untyped_storage().data_ptr() for _, tensor in weights}
        for arguments in vllm_compat.held_loader_arguments():
            for key, value in list(arguments.items()):
                in_buffer = (
                    isinstance(value, torch.Tensor)
                    and key != "param"
                    and value.untyped_storage().data_ptr() in storages
                )
                if in_buffer:
                    arguments[key] = value.clone()

    def gantry_receive_weights(
        self, plan: dict, manifest: str, version: int, replica: str
    ) -> str | None:
        """Receive a weight sync on this TP rank (full tensors; vLLM's weight loaders take
        this rank's slice) and load it in place, bucket by bucket. Returns None, or why the
        controller called the sync off: an exception raised here would reach the engine as
        vLLM's bare Exception when the worker runs in another process."""
        receiver = getattr(self, "_gantry_receiver", None)  # ours: made at the first sync
        if receiver is None:
            receiver = self._gantry_receiver = WeightReceiver(self.device)
        tp_rank = vllm_compat.tensor_parallel_rank()
        self.gantry_begin_load()
        try:
            receiver.receive(
                SyncPlan.model_validate(plan), manifest, version, replica, tp_rank,
                self._gantry_load_bucket,
            )  # fmt: skip
        except SyncCancelled as cancelled:
            return str(cancelled)
        finally:
            self.gantry_finish_load()
        return None

    def gantry_finish_load(self) -> None:
        model = self.model_runner.get_model()
        with vllm_compat.current_vllm_config(self), torch.no_grad():
            vllm_compat.finish_layerwise_reload(model, self.vllm_config.model_config)
            vllm_compat.repack_tied_embeddings(model)
        vllm_compat.reset_worker_caches(self.model_runner)

    def gantry_read_weights(self, serialize: bool) -> tuple[dict, Any]:
        model = self.model_runner.get_model()
        with torch.no_grad():
            entries = list(vllm_compat.hf_named_weights(model))
        specs = {name: list(spec) for name, _, spec in entries}
        tensors = {name: tensor.detach().to("cpu").clone() for name, tensor, _ in entries}
        if not serialize:
            return specs, tensors
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return specs, buffer.getvalue()
