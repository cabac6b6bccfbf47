"""Keys of cosmos-rl's config schema that Gantry accepts and ignores, with one warning.

A cosmos-rl config loads unchanged: each key listed here is dropped (with everything under it,
for a table) and named in a single `ConfigWarning`. A key that is neither in Gantry's schema
nor here is an error. As Gantry implements a key, it moves from here into
`gantry.config.schema`; a test checks that the two never overlap.
"""

from __future__ import annotations

# Keys of cosmos-rl's schema (cosmos_rl/policy/config/__init__.py) that Gantry accepts and ignores,
# with one warning. Section dotted path -> key names; "" is the top level. A key whose value is a
# table (policy.lora, [validation], ...) is dropped with everything under it.
_COSMOS_PARALLELISM = {
    "cp_rotate_method",  # gone from cosmos-rl's schema, still in many of its example configs
    "cp_size",
    "ep_size",
    "dp_shard_size",
    "dp_replicate_size",
    "pp_size",
    "pp_dynamic_shape",
    "pp_micro_batch_size",
    "pp_schedule",
    "pp_layers_per_stage",
}
_COSMOS_GRPO = {
    "trainer_type", "variant", "dataset", "dataloader_seed",
    "data_dispatch_as_rank_in_mesh", "enable_dataset_cache",
    "dataloader_prefetch_factor", "dataloader_batch_size", "prompt_column_name",
    "response_column_name", "reward_function", "use_remote_reward", "remote_reward",
    "filter_reward_metric", "bypass_reward", "group_reward_calculation", "temperature",
    "advantage_low", "advantage_high", "positive_nll_coef", "lower_bound_ratio",
    "unbiased_loss_max_tokens", "unbiased_advantage", "algo", "overlong_reward",
    "unbiased_kl_estimate", "off_policy_masking_delta", "aipo_rho",
    "batch_size_per_optimize", "max_token_len_per_mini_batch", "entropy_coeff", "on_policy",
    "uncentralized_training", "outdated_rollout_fetch_batch_size", "max_inflight_steps",
    "min_filter_prefix_tokens", "max_retry_for_on_policy", "reference_reset_interval",
    "reset_optimizer_with_reference", "balance_dp_token", "use_decoupled_loss",
    "behav_imp_weight_cap", "rollout_as_token_ids", "collect_rollout_logprobs",
    "use_rollout_logprobs_for_loss",
    "clip_ratio_c",  # not a schema field: cosmos-rl's VLA trainer reads it with getattr
}  # fmt: skip
_COSMOS_SFT = {
    "dataloader_drop_last", "conversation_column_name", "system_prompt",
    "enable_dp_load_balancing", "load_balanced_pool_size", "load_balanced_max_tokens_for_batch",
    "load_balanced_batching_strategy", "load_balanced_batches_per_optimizer_step",
    "dataloader_broadcast",
}  # fmt: skip

KNOWN_UNIMPLEMENTED: dict[str, set[str]] = {
    "": {"profiler", "distillation", "vla", "eth_ips", "mode"},
    "validation": {
        "dataset", "temperature", "top_p", "top_k", "repetition_penalty", "n_generation",
        "max_response_length", "reward_function",
    },
    "policy": {
        "diffusers", "is_diffusers", "model_safetensor_path", "model_revision", "lora",
        "trainable_map", "freeze_pattern", "trainable_pattern", "enable_liger_kernel",
        "enable_liger_cross_entropy", "enable_liger_fused_cross_entropy", "aux_loss_coeff",
    },
    "policy.parallelism": _COSMOS_PARALLELISM - {
        "dp_shard_size", "dp_replicate_size", "cp_size", "pp_size",
    },
    "rollout": {
        "include_stop_str_in_output", "enable_chunked_prefill", "n_generation_to_batch",
        "n_generation_mini_batch", "quantization", "vllm_use_flashinfer", "multi_turn_config",
        "mode", "async_config", "async_r2r_sync", "prefetch_rollout", "prefetch_queue_maxsize",
        "broadcast_all_params",
    },
    "rollout.parallelism": set(_COSMOS_PARALLELISM),
    "rollout.sampling_config": {"use_flashinfer"},
    "train": {
        "optm_warmup_start_factor", "optm_decay_ratio", "ema_enable", "ema_decay",
        "ema_update_step_interval", "transfer_dtype", "logprob_dtype", "fp8", "fp4", "timestamp", "epsilon", "async_tp_enabled", "compile",
        "coalesce_weight_sync", "deterministic", "activation_offload", "fa_version",
        "local_dataset", "force_use_hf", "non_text", "sequence_packing", "save_ckpt_at_exit",
        "signal_to_handle",
    },
    # cosmos-rl's train_policy is a union of its GRPO and SFT models: keys of either are known.
    "train.train_policy": _COSMOS_GRPO | _COSMOS_SFT,
    "train.ckpt": {"save_freq_in_epoch"},
    "logging": {"multi_modal_log_interval", "group_name", "report_mfu"},
}  # fmt: skip
