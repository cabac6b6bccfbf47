"""cosmos-rl keys that are not in Gantry's schema: which are moved, refused, or accepted as hints.

A cosmos-rl config (either release: the one the Cosmos-Reason1 guides pin, 0.2.6.post1 at
0bb46d1, or the current v0.4.4) loads in Gantry as follows:
- `MOVED`: a key the current release moved; it is read at its new place, with one line saying so.
- `REFUSED`: a key that changes what is trained or how. It is an error naming the key and what to
  do, unless its value is in `SAME_AS_GANTRY` (a value under which cosmos-rl does what Gantry
  does, e.g. `variant = "grpo"`): such a key is accepted and recorded like a hint.
- `HINTS`: a key that cannot change the result (performance, memory, logging, checkpoint
  cadence, parallel layout). It is accepted with one warning and recorded in run.json.
A key in none of these and not in the schema is an error. A key's value that is a table
(policy.lora, [profiler]) is judged as a whole. As Gantry implements a key, it moves from here
into `gantry.config.schema`; a test checks that the two never overlap.
The judgement of each key follows what cosmos-rl does with it (cosmos_rl/policy/config and the
trainers that read it); the reasons are in the comments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# Old place -> new place (cosmos-rl commit 4f5b0eda "Unify validation config", and #200).
MOVED: dict[str, str] = {
    "train.enable_validation": "validation.enable",
    "train.validation_step": "validation.freq",
    "train.validation_batch_per_replica": "validation.batch_size",
    "rollout.val_batch_size": "validation.batch_size",
    "train.train_policy.fully_on_policy": "train.train_policy.on_policy",
}

# ------------------------------------------------------------------------------------ hints
# Parallel layout: Gantry shards with FSDP2 only (tp/cp/pp = 1); how a model is split across
# devices changes speed and memory, never the math.
_PARALLEL_HINTS = {
    "cp_rotate_method",  # gone from cosmos-rl's schema, still in many of its example configs
    "ep_size", "pp_dynamic_shape", "pp_micro_batch_size", "pp_schedule", "pp_layers_per_stage",
}  # fmt: skip

HINTS: dict[str, set[str]] = {
    # profiler: traces only. eth_ips: which network interface carries traffic.
    "": {"profiler", "eth_ips"},
    # Sampling settings of cosmos-rl's GRPO validation (generation on a validation set), which
    # Gantry does not run: they cannot change the trained weights nor Gantry's SFT validation.
    "validation": {
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "n_generation",
        "max_response_length",
        "reward_function",
    },  # fmt: skip
    # Liger kernels: fused implementations of the same loss/activations, equal within float
    # tolerance. diffusers: settings read only when is_diffusers = true (refused).
    "policy": {
        "enable_liger_kernel",
        "enable_liger_cross_entropy",
        "enable_liger_fused_cross_entropy",
        "diffusers",
    },  # fmt: skip
    "policy.parallelism": _PARALLEL_HINTS,
    # The rollout side's layout keys cosmos-rl inherits from [policy.parallelism]: Gantry's
    # rollout replicas have only n_init_replicas and tp_size. The others are engine scheduling
    # (chunked prefill, n-generation batching, async engine, prefetch queues, how weights are
    # broadcast between rollout replicas): same samples, other speed.
    "rollout": {
        "enable_chunked_prefill",
        "n_generation_to_batch",
        "n_generation_mini_batch",
        "vllm_use_flashinfer",
        "mode",
        "async_config",
        "async_r2r_sync",
        "prefetch_rollout",
        "prefetch_queue_maxsize",
        "broadcast_all_params",
    },  # fmt: skip
    "rollout.parallelism": _PARALLEL_HINTS
    | {"cp_size", "dp_shard_size", "dp_replicate_size", "pp_size"},
    "rollout.sampling_config": {"use_flashinfer"},  # a sampling kernel, same distribution
    # timestamp names the output directory. compile / async_tp / fa_version / deterministic /
    # force_use_hf: kernels and compilation of the same model (equal within float tolerance).
    # Offload and weight-sync coalescing: memory and speed. local_dataset: where the dataset is
    # read. save_ckpt_at_exit / signal_to_handle: when checkpoints are written. ema_decay and
    # ema_update_step_interval are read only when ema_enable = true (refused).
    "train": {
        "timestamp",
        "async_tp_enabled",
        "compile",
        "coalesce_weight_sync",
        "deterministic",
        "activation_offload",
        "fa_version",
        "local_dataset",
        "force_use_hf",
        "save_ckpt_at_exit",
        "signal_to_handle",
        "ema_decay",
        "ema_update_step_interval",
    },  # fmt: skip
    # dataset / *_column_name: where cosmos-rl's built-in loader finds data; in Gantry (as in
    # cosmos-rl with a user dataset) the dataset script decides, and may read them from the
    # config. Dataloader caches, prefetching, batch sizes of the loader and how batches are
    # dispatched: speed only. balance_dp_token moves samples between the ranks of one step;
    # Gantry normalises the loss over the whole step, so the gradient is the same. remote_reward,
    # reset_optimizer_with_reference, load_balanced_*, clip_ratio_c:
    # read only with a refused key (use_remote_reward, reference_reset_interval,
    # enable_dp_load_balancing, [vla]). rollout_as_token_ids / collect_rollout_logprobs /
    # use_rollout_logprobs_for_loss: Gantry always sends token ids and the engine's log-probs
    # with each rollout and trains against them (docs/architecture.md).
    "train.train_policy": {
        "dataset",
        "prompt_column_name",
        "response_column_name",
        "conversation_column_name",
        "enable_dataset_cache",
        "dataloader_prefetch_factor",
        "dataloader_batch_size",
        "data_dispatch_as_rank_in_mesh",
        "dataloader_broadcast",
        "balance_dp_token",
        "remote_reward",
        "reset_optimizer_with_reference",
        "load_balanced_pool_size",
        "load_balanced_max_tokens_for_batch",
        "load_balanced_batching_strategy",
        "load_balanced_batches_per_optimizer_step",
        "clip_ratio_c",
        "rollout_as_token_ids",
        "collect_rollout_logprobs",
        "use_rollout_logprobs_for_loss",
    },  # fmt: skip
    "train.ckpt": {"save_freq_in_epoch"},  # when checkpoints are written, not what is trained
    "logging": {"multi_modal_log_interval", "group_name", "report_mfu"},
}

# ---------------------------------------------------------------------------------- refused
_REMOVE = "remove it"
_NOT_IMPLEMENTED = "not implemented by Gantry: remove it"

REFUSED: dict[str, dict[str, str]] = {
    "": {
        "distillation": "distillation is not implemented by Gantry: remove [distillation]",
        "vla": "vision-language-action training is not implemented by Gantry: remove [vla]",
        "mode": "Gantry runs policy and rollout disaggregated (mode = 'disaggregated'): remove it",
    },
    # validation.dataset names a Hub dataset to validate on; Gantry validates on the dataset
    # script's get_val_dataset(config). Remote rewards are not implemented.
    "validation": {
        "dataset": "Gantry validates on the dataset script's get_val_dataset(config): remove it",
        "use_remote_reward": "remote rewards are " + _NOT_IMPLEMENTED,
        "remote_reward": "remote rewards are " + _NOT_IMPLEMENTED,
    },
    "policy": {
        "is_diffusers": "diffusion models are " + _NOT_IMPLEMENTED,
        "model_safetensor_path": "give the weights' directory as policy.model_name_or_path",
        "model_revision": "download that revision and give its directory as "
        "policy.model_name_or_path",
        "trainable_map": "freezing parameters is " + _NOT_IMPLEMENTED + " (all weights train)",
        "freeze_pattern": "freezing parameters is " + _NOT_IMPLEMENTED + " (all weights train)",
        "trainable_pattern": "freezing parameters is " + _NOT_IMPLEMENTED + " (all weights train)",
        "aux_loss_coeff": "the MoE auxiliary loss is " + _NOT_IMPLEMENTED,
    },
    "rollout": {
        "include_stop_str_in_output": "Gantry's completions end at the end-of-sequence token: "
        + _REMOVE,
        "quantization": "quantised rollout is " + _NOT_IMPLEMENTED + " (rollout.dtype sets the "
        "engine's dtype)",
        "multi_turn_config": "multi-turn rollout is " + _NOT_IMPLEMENTED,
    },
    "train": {
        "optm_warmup_start_factor": "Gantry warms up from 0: remove it",
        "optm_decay_ratio": "Gantry decays over all steps after the warm-up: remove it",
        "ema_enable": "an EMA of the weights is " + _NOT_IMPLEMENTED,
        "transfer_dtype": "use rollout.dtype, the dtype weights are sent to the rollout in",
        "logprob_dtype": "Gantry computes log-probs in float32: remove it",
        "fp8": "FP8 training is " + _NOT_IMPLEMENTED + " ([train.fp8])",
        "fp4": "FP4 training is " + _NOT_IMPLEMENTED + " ([train.fp4])",
        "non_text": "non-text training is " + _NOT_IMPLEMENTED,
        "sequence_packing": "sequence packing is " + _NOT_IMPLEMENTED,
    },
    "train.train_policy": {
        "trainer_type": "custom trainers are not implemented by Gantry: remove it",
        "algo": "only the 'grpo' algorithm is implemented: remove it",
        "use_remote_reward": "cosmos-rl's remote reward service (enqueue/fetch URLs from "
        "environment variables) is not implemented: give your scorer's URL as "
        "train.train_policy.reward_server.url (docs/dataset-scripts.md)",
        "bypass_reward": _NOT_IMPLEMENTED,
        "group_reward_calculation": "rewards are computed per completion: remove it",
        "temperature": "Gantry's policy computes log-probs at rollout.sampling_config."
        "temperature: set that and remove this key",
        "advantage_low": "Gantry does not clip advantages: remove it",
        "advantage_high": "Gantry does not clip advantages: remove it",
        "batch_size_per_optimize": "one optimizer step per train_batch_per_replica batch "
        "(x mu_iterations): remove it",
        "max_token_len_per_mini_batch": "use train.train_policy.mini_batch",
        "uncentralized_training": _NOT_IMPLEMENTED,
        "outdated_rollout_fetch_batch_size": "use train.train_policy.allowed_outdated_steps",
        "max_inflight_steps": "use train.train_policy.allowed_outdated_steps",
        "reference_reset_interval": "resetting the reference model is " + _NOT_IMPLEMENTED,
        "dataloader_seed": "Gantry shuffles with train.seed: set that and remove this key",
        "dataloader_drop_last": "Gantry trains on full batches only (drop_last = true): remove it",
        "system_prompt": "put the system prompt into the dataset script's conversations",
        "enable_dp_load_balancing": "token load balancing is " + _NOT_IMPLEMENTED,
    },
}


# ---------------------------------------------------------------------------- same as Gantry
def _is(*values: Any) -> Callable[[Any, dict[str, Any]], bool]:
    """The value is one of `values`, type included (TOML's true is not 1)."""
    return lambda value, raw: any(type(value) is type(v) and value == v for v in values)


def _off(flag: str) -> Callable[[Any, dict[str, Any]], bool]:
    """A table whose `flag` is absent or false (the feature it configures is off)."""
    return lambda value, raw: isinstance(value, dict) and value.get(flag, False) is False


def _get(raw: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _same_temperature(value: Any, raw: dict[str, Any]) -> bool:
    # cosmos-rl's policy divides logits by train_policy.temperature; Gantry's by the sampler's.
    return value == _get(raw, "rollout.sampling_config.temperature", 1.0)


def _never_clips(sign: int) -> Callable[[Any, dict[str, Any]], bool]:
    """An advantage bound no group-normalised advantage reaches: with n completions, |(r -
    mean) / std| <= (n - 1) / sqrt(n) (cosmos-rl's default 5 is never reached for n <= 26)."""

    def check(value: Any, raw: dict[str, Any]) -> bool:
        n = _get(raw, "rollout.n_generation", 8)
        if not isinstance(value, int | float) or isinstance(value, bool) or not isinstance(n, int):
            return False
        return sign * value >= (n - 1) / math.sqrt(max(n, 1))

    return check


# Dotted key -> whether a value makes cosmos-rl do what Gantry does; such a refused key is then
# accepted (and recorded). Mostly cosmos-rl's defaults.
SAME_AS_GANTRY: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
    "distillation": _off("enable"),
    "mode": _is("disaggregated"),
    "validation.dataset": lambda value, raw: isinstance(value, dict) and not value.get("name"),
    "validation.use_remote_reward": _is(None, False),
    "validation.remote_reward": _is(None),
    "policy.is_diffusers": _is(False),
    "policy.model_safetensor_path": _is(None, ""),
    "policy.model_revision": _is(None, ""),
    "policy.trainable_map": _is(None),
    "policy.freeze_pattern": _is(None),
    "policy.trainable_pattern": _is(None),
    "policy.aux_loss_coeff": _is(0.0, 0),
    "rollout.include_stop_str_in_output": _is(False),
    "rollout.quantization": _is("none"),
    "rollout.multi_turn_config": _off("enable"),
    "train.optm_warmup_start_factor": _is(0.0, 0),
    "train.optm_decay_ratio": _is(None),
    "train.ema_enable": _is(False),
    "train.transfer_dtype": _is(None),
    "train.logprob_dtype": _is("float32"),
    "train.fp8": _off("enable_fp8"),
    "train.fp4": _off("enable_fp4"),
    "train.non_text": _is(False),
    "train.sequence_packing": _is(False),
    "train.train_policy.trainer_type": lambda value, raw: (
        value == _get(raw, "train.train_policy.type", "grpo")
    ),
    "train.train_policy.algo": _is("grpo"),
    "train.train_policy.use_remote_reward": _is(False),
    "train.train_policy.bypass_reward": _is(False),
    "train.train_policy.group_reward_calculation": _is(False),
    "train.train_policy.temperature": _same_temperature,
    "train.train_policy.advantage_low": _never_clips(-1),
    "train.train_policy.advantage_high": _never_clips(1),
    "train.train_policy.batch_size_per_optimize": _is(None),
    "train.train_policy.max_token_len_per_mini_batch": _is(None),
    "train.train_policy.uncentralized_training": _is(False),
    "train.train_policy.outdated_rollout_fetch_batch_size": _is(0),
    "train.train_policy.max_inflight_steps": _is(None),
    "train.train_policy.reference_reset_interval": _is(None),
    "train.train_policy.dataloader_seed": _is(0),
    "train.train_policy.dataloader_drop_last": _is(True),
    "train.train_policy.system_prompt": _is(""),
    "train.train_policy.enable_dp_load_balancing": _is(False),
}
# No accepted value: vla.


def known_keys(section: str) -> set[str]:
    """Every cosmos-rl key of `section` that is not in Gantry's schema (for "did you mean")."""
    return HINTS.get(section, set()) | set(REFUSED.get(section, {}))
