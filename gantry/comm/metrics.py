"""The one definition of every metric a run reports: its name, unit and how it is computed.

The names are the keys of metrics.jsonl records, and the names under which the trackers
(wandb, TensorBoard) log them; docs/metrics.md is checked against this table. A record key that
is not defined here fails the tests (tests/test_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # "", "s", "tokens", "1/s", "fraction", "GB/s", ...
    how: str  # how it is computed, one sentence
    algo: str = "grpo"  # "grpo", "sft", "both"


def _table(*metrics: Metric) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


# Bookkeeping keys of a record, not metrics (not sent to trackers as scalars).
RECORD_KEYS = frozenset({"step", "epoch", "prompt_ids", "validation", "dropped_prompt_ids"})

# ---- the policy's step (policy/) ------------------------------------------------------------
POLICY = _table(
    Metric(
        "loss",
        "",
        "the step's loss as trained, all ranks: GRPO aggregated by loss_type (token mean by "
        "default) with its KL, entropy and NLL terms; SFT: token mean over the trained tokens",
        "both",
    ),
    Metric(
        "kl_ref",
        "",
        "KL to the reference model by kl_estimator (k3 by default), token mean (0 when "
        "kl_beta = 0)",
    ),
    Metric("kl_behaviour", "", "k3 KL to the weights that sampled the batch, token mean"),
    Metric(
        "ratio_mean",
        "",
        "importance ratio pi / pi_old, token mean: pi_old is the behaviour policy, or the "
        "proximal one with use_decoupled_loss; with variant = 'gspo' each token has its "
        "completion's sequence ratio",
    ),
    Metric("ratio_max", "", "largest importance ratio pi / pi_old of the step's tokens"),
    Metric(
        "clip_fraction",
        "fraction",
        "completion tokens whose clipped term the loss took (no gradient): clip_low_fraction "
        "+ clip_high_fraction",
    ),
    Metric(
        "clip_low_fraction",
        "fraction",
        "completion tokens with ratio < 1 - epsilon_low and a negative advantage",
    ),
    Metric(
        "clip_high_fraction",
        "fraction",
        "completion tokens with ratio > 1 + epsilon_high and a positive advantage",
    ),
    Metric(
        "entropy",
        "nats",
        "entropy of the policy's next-token distribution (logits / sampling temperature, "
        "tokens the sampler bans excluded), token mean over the completion tokens",
    ),
    Metric(
        "logprob_gap_mean",
        "nats",
        "mean |log p_policy - log p_rollout| over the completion tokens: the rollout engine's "
        "log-probs against the policy's on the same tokens, the policy's taken before the "
        "step's first update. Pure engine/trainer mismatch for groups sampled by those same "
        "weights (staleness 0); for staler groups the policy's weights have moved since they "
        "were sampled, and the gap includes that drift",
    ),
    Metric(
        "dual_clip_fraction",
        "fraction",
        "completion tokens with a negative advantage whose loss the dual clip bounded at "
        "-lower_bound_ratio x A (no gradient)",
    ),
    Metric(
        "behav_imp_weight_mean",
        "",
        "use_decoupled_loss: the behaviour importance weight pi_prox / pi_behaviour before its "
        "cap (per token, or per completion with behav_imp_weight_level = 'sequence'), token mean "
        "(0 without the decoupled loss)",
    ),
    Metric(
        "behav_imp_weight_max",
        "",
        "use_decoupled_loss: the largest behaviour importance weight of the step, before its cap",
    ),
    Metric(
        "behav_imp_weight_capped_fraction",
        "fraction",
        "use_decoupled_loss: completion tokens whose behaviour weight was truncated or masked "
        "(behav_imp_weight_cap, behav_imp_weight_floor)",
    ),
    Metric("grad_norm", "", "total gradient norm before clipping", "both"),
    Metric("lr", "", "learning rate of the step", "both"),
    Metric("tokens", "tokens", "GRPO: completion tokens; SFT: non-pad tokens of the step", "both"),
    Metric("policy_seconds", "s", "wall time of the policy step on rank 0", "both"),
    Metric(
        "policy_forward_s",
        "s",
        "rank 0's seconds in forward passes of the step (policy, reference model, loss; CUDA "
        "synchronised at each end)",
    ),
    Metric("policy_backward_s", "s", "rank 0's seconds in backward passes of the step"),
    Metric(
        "policy_optimizer_s",
        "s",
        "rank 0's seconds in gradient clipping, the optimizer and LR scheduler steps",
    ),
    Metric(
        "policy_idle_fraction",
        "fraction",
        "share of rank 0's wall time from the end of the previous step to the end of this one "
        "spent waiting for a command (not training, syncing, checkpointing, exporting, "
        "validating)",
        "both",
    ),
    Metric(
        "weight_sync_s",
        "s",
        "the transfer time of the latest weight sync policy rank 0 sent, check-in wait and "
        "group set-up excluded (0 before the first sync)",
    ),
    Metric(
        "weight_sync_wait_s",
        "s",
        "the latest sync's wait at the check-in, until every rollout rank arrived",
    ),
    Metric(
        "weight_sync_gbps",
        "GB/s",
        "bytes policy rank 0 sent in the latest sync (its shard, in the transfer dtype) / "
        "weight_sync_s",
    ),
    Metric(
        "weight_sync_efficiency",
        "fraction",
        "weight_sync_gbps / the GB/s of one plain broadcast of a buffer as large as rank 0's "
        "share (at most 64 MB) over the same process group, timed when the group formed",
    ),
    Metric("assistant_tokens", "tokens", "SFT: assistant (trained) tokens of the step", "sft"),
    Metric("tokens_per_s", "1/s", "SFT: tokens / policy_seconds", "sft"),
    Metric("truncated_samples", "", "SFT: conversations cut at model_max_length", "sft"),
    Metric(
        "padding_fraction",
        "fraction",
        "SFT: pad positions / all positions (rows x padded length) of the step's micro-batches, "
        "all ranks",
        "sft",
    ),
    Metric("val_loss", "", "validation loss, token mean over assistant tokens", "sft"),
    Metric("val_tokens", "tokens", "assistant tokens of the validation set", "sft"),
    Metric("val_samples", "", "validation conversations", "sft"),
    Metric("val_seconds", "s", "wall time of the validation pass", "sft"),
)

# ---- rollouts and the controller (rollout/, controller/) ------------------------------------
# GRPO: computed by controller.grpo_metrics from the step's rollout groups ("completions" are
# all samples of the step, n per prompt); seconds measured on the rollout replicas are carried
# in each group (its equal share of its rollout batch) and summed over the step's groups.
CONTROLLER = _table(
    Metric("reward_mean", "", "mean reward over every completion of the step"),
    Metric("reward_std", "", "standard deviation (population) of the step's completion rewards"),
    Metric("reward_min", "", "lowest completion reward of the step"),
    Metric("reward_max", "", "highest completion reward of the step"),
    Metric(
        "reward/<fn>",
        "",
        "mean over the step's completions of reward function <fn> (its __name__, the reward "
        "server's name or 'overlong'), unweighted; the reward is the weighted sum of these "
        "(train.train_policy.reward_function)",
    ),
    Metric(
        "reward_info/<key>",
        "",
        "mean over the step's completions of the numeric <key> of the info dicts that reward "
        "functions returned with their values ((value, info))",
    ),
    Metric(
        "overlong_penalised_fraction",
        "fraction",
        "completions that DAPO's overlong penalty lowered (longer than max_response_length - "
        "overlong_reward.buffer_length); only with the 'overlong' reward part",
    ),
    Metric(
        "dapo_groups_drawn",
        "groups",
        "variant = 'dapo': groups the step drew, its batch's plus those dropped since the "
        "previous batch (dropped_prompt_ids lists them)",
    ),
    Metric(
        "dapo_groups_dropped",
        "groups",
        "variant = 'dapo': groups dropped since the previous batch because all their "
        "completions got the same reward (visited, never trained)",
    ),
    Metric(
        "reward_group_std_mean",
        "",
        "mean over the step's groups of the within-group reward std (unbiased): the spread "
        "the advantages are normalised by",
    ),
    Metric(
        "groups_all_equal_fraction",
        "fraction",
        "groups whose completions all got the same reward: zero advantages, no learning signal",
    ),
    Metric("completion_len_mean", "tokens", "mean completion length of the step"),
    Metric("completion_len_max", "tokens", "longest completion of the step"),
    Metric(
        "truncated_fraction",
        "fraction",
        "completions cut at rollout.max_response_length (finish_reason 'length')",
    ),
    Metric("staleness_mean", "versions", "mean over groups of (step version - policy_version)"),
    Metric("staleness_max", "versions", "max over groups of (step version - policy_version)"),
    Metric(
        "staleness_hist",
        "groups",
        "list: element i counts the step's groups i versions stale (0 to max_staleness)",
    ),
    Metric("samples_per_s", "1/s", "completions trained / seconds since the previous step"),
    Metric(
        "completion_tokens_per_s",
        "1/s",
        "completion tokens trained / seconds since the previous step",
    ),
    Metric(
        "generation_seconds",
        "s",
        "rollout replicas' time building prompts and generating, summed over the step's groups",
    ),
    Metric(
        "scoring_seconds",
        "s",
        "rollout replicas' time decoding and running the reward functions, summed over groups",
    ),
    Metric(
        "rollout_idle_fraction",
        "fraction",
        "idle / all seconds of the rollout replicas, over the results received since the "
        "previous step (gantry.run.activity 'idle': waiting for prompts or commands)",
    ),
    Metric(
        "controller_seconds",
        "s",
        "CPU time of the controller loop's thread since the previous step: work, not waits",
    ),
    Metric(
        "controller_cpu_s",
        "s",
        "CPU time of the whole controller process (all its threads: the loop, the trackers) "
        "since the previous step",
    ),
    Metric(
        "control_latency_p50_ms",
        "ms",
        "median time from a message's send (its Redis stream id) to the start of its handling, "
        "over the results and events the controller handled and the commands the policy "
        "handled since the previous step: the control plane's own latency",
    ),
    Metric(
        "control_latency_p99_ms",
        "ms",
        "99th percentile (nearest rank) of the same send-to-handling latencies",
    ),
    Metric(
        "sync_order_latency_ms",
        "ms",
        "longest time, over the rollout replicas that took a weight sync since the previous "
        "step, from the controller's sync order to the replica starting on it (a generate call "
        "in flight is finished first); 0 with no sync",
    ),
    Metric("dropped_stale", "", "groups dropped so far for exceeding max_staleness"),
    Metric("elapsed_s", "s", "seconds since the controller started the run", "both"),
)

METRICS: dict[str, Metric] = {**POLICY, **CONTROLLER}

# Names with a "<part>" stand for a family of keys: "reward/<fn>" defines "reward/accuracy".
_FAMILIES = {name.split("<")[0]: metric for name, metric in METRICS.items() if "<" in name}


def metric_of(key: str) -> Metric | None:
    """The definition of a record key: its own, or its family's ("reward/<fn>")."""
    if key in METRICS:
        return METRICS[key]
    return next((m for prefix, m in _FAMILIES.items() if key.startswith(prefix)), None)


def undefined_keys(record: dict) -> list[str]:
    """Keys of a metrics record that are neither a defined metric nor bookkeeping."""
    return sorted(k for k in record if metric_of(k) is None and k not in RECORD_KEYS)


def markdown_table(table: dict[str, Metric]) -> str:
    """A table of docs/metrics.md (POLICY or CONTROLLER): each metric, its unit, the runs that
    report it and how it is computed."""
    lines = ["| name | unit | runs | how |", "| --- | --- | --- | --- |"]
    for m in table.values():
        runs = m.algo.replace("both", "grpo, sft")
        how = m.how.replace("|", "\\|")  # a "|" inside a cell would end it
        lines.append(f"| `{m.name}` | {m.unit or '-'} | {runs} | {how} |")
    return "\n".join(lines)
