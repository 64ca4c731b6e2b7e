"""The one structured config schema of lpreg.

Every default lives here, and every key's meaning, in its field's metadata:
``lpreg config --reference`` writes docs/configuration.md from them. The defaults describe
the embedded demo: a local Ray, a tiny model built on the spot, CPU only. Recipes in
``conf/recipes/`` and command-line overrides change values; they cannot add keys the
schema does not know.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

# The names every choice-valued key accepts. The implementations live elsewhere
# (learner.POLICY_LOSSES, launch.data.synthetic, ...); tests hold the two lists equal.
POLICY_LOSSES = ("ppo_clip", "lp_reg", "gspo", "kl_cov", "clip_cov", "entropy_8020")
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
LP_REG_THRESHOLD_SCOPES = ("batch", "micro_batch")
LP_REG_FILTERS = ("min_p", "none")
STALE_POLICIES = ("auto", "learner", "behaviour")
SYNTHETIC_KINDS = ("sum", "linear", "fraction", "spark_sum", "tool_product")
CHAT_TEMPLATE_MODES = ("auto", "always", "never")
WEIGHT_SYNC_TRANSPORTS = ("auto", "object_store", "broadcast", "nccl")
# Older names a key still accepts, and what they mean now.
WEIGHT_SYNC_ALIASES = {"nccl": "broadcast"}
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DTYPES = ("float32", "bfloat16", "float16")
DIST_BACKENDS = ("auto", "gloo", "nccl")
ZERO_STAGES = (0, 1, 2, 3)
LR_SCHEDULERS = ("constant", "linear", "cosine")
METRICS_LOGGERS = ("jsonl", "tensorboard", "wandb")
TOOL_SANDBOXES = ("auto", "bwrap", "rlimits")


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric key; ``None`` leaves a side open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        return " and ".join(part for part in (low, high) if part)


# Every key says what it means in its field's metadata ("doc"), through one of the three
# helpers below: the reference page (`lpreg config --reference`) is built from it, and a
# test fails on a key without one. Comments beside a field say why, for developers.
def one_of(default: Any, choices: tuple, *, doc: str) -> Any:
    """A key that takes one of ``choices``; the loader refuses anything else."""
    return field(default=default, metadata={"choices": choices, "doc": doc})


def within(default: Any, *, doc: str, **bounds: float) -> Any:
    """A numeric key with bounds (``ge``, ``gt``, ``le``, ``lt``); ``None`` passes when the
    key's type allows it."""
    return field(default=default, metadata={"range": Range(**bounds), "doc": doc})


def doc(default: Any, meaning: str) -> Any:
    """A key with neither choices nor a range. A list or mapping default is copied for each
    config, as dataclasses require of mutable defaults."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": meaning})
    return field(default=default, metadata={"doc": meaning})


def section(cls: type) -> Any:
    """A nested section of keys; what it is about is its class's docstring."""
    return field(default_factory=cls)


@dataclass
class TinyModelConfig:
    """Shape and warm start of the tiny model built locally when ``model.path`` is not given."""

    num_layers: int = within(4, ge=1, doc="decoder layers")
    hidden_size: int = within(128, ge=1, doc="width of the residual stream")
    # head_dim = 128 / 2 = 64: vLLM's CPU attention rejects smaller heads.
    num_heads: int = within(2, ge=1, doc="attention heads; hidden_size / num_heads is the head size")
    num_kv_heads: int = within(2, ge=1, doc="key/value heads (grouped-query attention below num_heads)")
    intermediate_size: int = within(256, ge=1, doc="width of the MLP")
    max_position_embeddings: int = within(256, ge=1, doc="longest sequence the model has positions for")
    seed: int = doc(0, "seed of the random initialisation and of the warm start's problems")
    # The warm start stops early on purpose: RL needs a model that is right sometimes,
    # with room left to improve.
    warm_start_steps: int = within(
        2000, ge=0, doc="most supervised steps on the synthetic task (data.synthetic) before RL; it stops "
                        "once the probe accuracy reaches warm_start_target_accuracy (0: the random init)")
    warm_start_target_accuracy: float = within(
        0.25, gt=0, le=1, doc="greedy accuracy on the probe problems at which the warm start stops")
    warm_start_probe_every: int = within(10, ge=1, doc="warm-start steps between two probes")
    warm_start_probe_problems: int = within(200, ge=1, doc="problems in the warm start's probe set")
    warm_start_batch_size: int = within(64, ge=1, doc="problems per warm-start step")
    # A linear warm-up and a moderate rate keep the sudden jump a smooth climb: at 2e-3
    # without warm-up some seeds oscillate for thousands of steps and never make it.
    warm_start_lr: float = within(1e-3, gt=0, doc="learning rate of the warm start, after its warm-up")
    warm_start_warmup_steps: int = within(
        100, ge=0, doc="steps of the warm start's linear learning-rate warm-up")


@dataclass
class ModelConfig:
    """The policy: a Hugging Face model directory, or the tiny model built on the spot."""

    path: str | None = doc(
        None, "Hugging Face model directory; null builds the tiny model (model.tiny), once, into cache_dir")
    cache_dir: str = doc("models", "where bootstrapped tiny models are kept")
    dtype: str = one_of(
        "float32", DTYPES, doc="dtype of the weights: float32 keeps vLLM's and the learner's log-probs "
                               "equal on CPU; bfloat16 for GPUs")
    tiny: TinyModelConfig = section(TinyModelConfig)


@dataclass
class SyntheticTaskConfig:
    """Generated problems with verifiable answers; the operand range is the difficulty knob."""

    kind: str = one_of(
        "sum", SYNTHETIC_KINDS, doc="sum: a+b(+c...)=; linear: solve a*x+b=c for the integer x; "
                                    "fraction: a/b+c/d(+...)= in lowest terms; spark_sum: the problems of "
                                    "sum (try num_operands=4), warm-started on responses that sometimes "
                                    "recheck after a spark token (docs/data.md); tool_product: a*b= "
                                    "(try 3-digit operands), warm-started on responses that sometimes "
                                    "call the Python tool (docs/multi_turn.md)")
    num_operands: int = within(2, ge=2, doc="operands of a sum or fraction problem")
    min_operand: int = doc(10, "smallest operand (at most max_operand)")
    max_operand: int = doc(99, "largest operand")
    seed: int = doc(0, "seed of the generated problems")


@dataclass
class DataConfig:
    """The prompts: where they come from and how they meet the tokenizer."""

    train_path: str | None = doc(
        None, "JSONL or Parquet file of training prompts (lpreg's or verl's layout); null uses the "
              "synthetic task")
    eval_path: str | None = doc(None, "held-out problems for evaluation; null uses fresh synthetic ones")
    prompt_key: str | None = doc(None, "dotted path to a row's prompt, e.g. question; null: prompt")
    answer_key: str | None = doc(
        None, "dotted path to a row's reference answer, e.g. reward_model.ground_truth; null: answer, "
              "or verl's reward_model.ground_truth in a row without one")
    prompts_per_step: int = within(32, ge=1, doc="prompts (GRPO groups) per training step")
    max_prompt_tokens: int = within(64, ge=1, doc="longer prompts are skipped and counted")
    chat_template: str = one_of(
        "auto", CHAT_TEMPLATE_MODES,
        doc="auto: prompts go through the tokenizer's chat template when it has one (a plain string "
            "becomes one user message); always: the template is required; never: plain strings as "
            "they are, as base models trained on raw text expect")
    synthetic: SyntheticTaskConfig = section(SyntheticTaskConfig)
    num_synthetic_train: int = within(20000, ge=1, doc="synthetic training problems")
    num_synthetic_eval: int = within(500, ge=0, doc="synthetic held-out problems")


@dataclass
class RolloutConfig:
    """The vLLM rollout workers: sampling, resources, failures and weight updates."""

    num_workers: int = within(2, ge=1, doc="vLLM engines, one Ray actor each")
    samples_per_prompt: int = within(8, ge=1, doc="n: responses per prompt, the size of each GRPO group")
    # The learner scores tokens at this temperature, so it must be above 0.
    temperature: float = within(
        1.0, gt=0, doc="sampling temperature, also the learner's; greedy decoding is for evaluation "
                       "(trainer.eval_temperature)")
    top_p: float = within(1.0, gt=0, le=1, doc="nucleus sampling: the probability mass sampled from")
    max_response_tokens: int = within(16, ge=1, doc="response cap, in tokens")
    cpus_per_worker: float = within(1.0, ge=0, doc="CPUs Ray reserves for each rollout worker")
    gpus_per_worker: float = within(
        0.0, ge=0, doc="GPUs per rollout worker and tensor-parallel rank; a fraction shares a GPU")
    tensor_parallel_size: int = within(1, ge=1, doc="GPUs one engine shards its model over")
    # On CPU, 0.92 (vLLM's default) fails at start-up.
    gpu_memory_utilization: float = within(
        0.2, gt=0, le=1, doc="vLLM's share of GPU memory; on CPU, of the NUMA node's RAM")
    cpu_kv_cache_gib: int = within(1, ge=1, doc="KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int = within(256, ge=1, doc="longest prompt plus response an engine takes, in tokens")
    enforce_eager: bool = doc(True, "run vLLM eagerly, without CUDA graphs")
    # The heartbeat is normally answered within a second.
    timeout_s: float = within(
        120.0, gt=0, doc="seconds a worker may leave the driver's heartbeat unanswered, or make no "
                         "progress on its work, before it is killed and replaced; its requests go elsewhere")
    startup_timeout_s: float = within(600.0, gt=0, doc="seconds to wait for an engine to start")
    max_num_seqs: int = within(
        256, ge=1, doc="sequences one engine generates at once (vLLM's max_num_seqs); more groups wait "
                       "on the driver and go to the first worker that frees up")
    max_staleness: int = within(
        0, ge=0, doc="k: weight versions a sample may lag the learner. 0: lock-step (generate, train, "
                     "sync); k >= 1: workers generate up to k steps ahead, and older samples are "
                     "dropped and counted")
    # Every token records the version that produced it.
    partial_rollout: bool = doc(
        False, "at a weight update, samples still generating continue under the new weights (their "
               "tokens so far join the prompt) instead of finishing under the old ones")
    max_restarts: int = within(
        3, ge=0, doc="replacements of lost or hung rollout workers over the run; one more loss stops it")
    # The min-p proxy is exact where these tokens include every token it keeps.
    top_logprobs: int = within(
        20, ge=0, doc="K most likely tokens per position that vLLM reports, for Lp-Reg's proxy under "
                      "algorithm.stale_policy=behaviour; not asked for otherwise")
    weight_sync: str = one_of(
        "auto", WEIGHT_SYNC_TRANSPORTS,
        doc="how weights reach the engines. object_store: through Ray's object store, each worker "
            "reloads; broadcast: straight into every engine through vLLM's weight-transfer API (NCCL "
            "on GPUs, gloo on CPUs; nccl is its old name); auto: broadcast when the rollout workers "
            "have GPUs not shared with a learner, the object store otherwise")
    broadcast_bucket_mb: int = within(
        256, ge=1, doc="MiB per broadcast bucket: neither side holds more than a bucket beyond the model")
    verify_weight_sync: bool = doc(
        False, "after every sync, read back and log a checksum of every engine's weights")
    # 0 keeps the single-turn path exactly as it was: no tool pool, no marker matching.
    max_turns: int = within(
        0, ge=0, doc="tool calls per response: the model's code blocks (tool.code_start ... tool.code_end) "
                     "run in the sandbox and their output joins the response as an observation, which "
                     "takes no part in training; rollout.max_response_tokens bounds the whole response, "
                     "observations included. 0: single turn, no tools")


@dataclass
class LearnerConfig:
    """The DeepSpeed learners: data-parallel ranks, micro-batches and the optimizer."""

    num_workers: int = within(2, ge=1, doc="DeepSpeed data-parallel ranks, one Ray actor each")
    zero_stage: int = one_of(0, ZERO_STAGES, doc="DeepSpeed ZeRO stage")
    micro_batch_size: int = within(32, ge=1, doc="sequences per forward pass on one learner")
    lr: float = within(2e-4, gt=0, doc="AdamW learning rate")
    weight_decay: float = within(0.0, ge=0, doc="AdamW weight decay")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas: two numbers in [0, 1)")
    grad_clip: float = within(1.0, ge=0, doc="gradient-norm clipping (0: none)")
    cpus_per_worker: float = within(1.0, ge=0, doc="CPUs Ray reserves for each learner rank")
    gpus_per_worker: float = within(0.0, ge=0, doc="GPUs per learner rank; a fraction shares a GPU")
    dist_backend: str = one_of(
        "auto", DIST_BACKENDS, doc="torch.distributed backend; auto: nccl when the learner sees a GPU, "
                                   "gloo otherwise")
    timeout_s: float = within(
        600.0, gt=0, doc="seconds to wait for the learners' step, or their checkpoint save or load")
    startup_timeout_s: float = within(
        600.0, gt=0, doc="seconds to wait for the learners to start, join their group and load the model")
    # Long-tailed response lengths then cost memory by the budget, not by the longest
    # response times the count.
    max_tokens_per_micro_batch: int = within(
        0, ge=0, doc="micro-batches by a budget of padded tokens (rows x (longest prompt + longest "
                     "response)) per forward, sequences grouped by length (0: micro_batch_size sequences)")
    gradient_checkpointing: bool = doc(
        False, "recompute each decoder layer's activations in the backward pass: far less activation "
               "memory for about one more forward of compute")
    logits_chunk_tokens: int = within(
        0, ge=0, doc="positions whose logits exist at once: the output projection, log-probs, entropy and "
                     "Lp-Reg proxy run chunk by chunk (0: the whole micro-batch at once)")
    lr_scheduler: str = one_of(
        "constant", LR_SCHEDULERS, doc="learning rate over optimizer steps: constant, or linear or cosine "
                                       "decay to min_lr_ratio * lr, after lr_warmup_steps of linear warm-up")
    lr_warmup_steps: int = within(0, ge=0, doc="optimizer steps of linear learning-rate warm-up")
    min_lr_ratio: float = within(0.0, ge=0, le=1, doc="where linear and cosine decay end, as a share of lr")


@dataclass
class AlgorithmConfig:
    """The RL objective: advantages, the policy loss, its regularisers and corrections."""

    advantage: str = one_of("grpo", ADVANTAGE_ESTIMATORS, doc="advantage estimator")
    loss: str = one_of("lp_reg", POLICY_LOSSES, doc="policy loss")
    loss_agg_mode: str = one_of("token-mean", LOSS_AGG_MODES, doc="how token losses add up to one loss")
    clip_ratio_low: float = within(
        0.2, ge=0, le=1, doc="the ratio is clipped below at 1 - clip_ratio_low")
    clip_ratio_high: float = within(0.28, ge=0, doc="the ratio is clipped above at 1 + clip_ratio_high")
    filter_groups: bool = doc(
        False, "dynamic sampling (DAPO): drop each group whose rewards are all equal (zero advantage) and "
               "generate more on fresh prompts, until data.prompts_per_step groups are kept or "
               "max_generation_rounds have run")
    max_generation_rounds: int = within(3, ge=1, doc="most generation rounds per step under filter_groups")
    # 1 and 1 is on-policy: the old log-probs and the Lp-Reg proxy then come from the
    # training forward pass itself.
    mini_batches_per_step: int = within(
        1, ge=1, doc="mini-batches (optimizer steps) each rollout batch is cut into")
    epochs_per_step: int = within(1, ge=1, doc="passes over each rollout batch")
    lp_reg_neg_frac: float = within(
        0.01, ge=0, le=1, doc="rho: share of the negative-advantage tokens, the lowest-probability ones, "
                              "that Lp-Reg considers")
    lp_reg_pos_frac: float = within(
        0.0, ge=0, le=1, doc="the same share for positive-advantage tokens")
    # "batch" makes the regularised tokens independent of micro_batch_size,
    # max_tokens_per_micro_batch and the number of learners; "micro_batch" reproduces
    # the authors' numbers exactly.
    lp_reg_threshold_scope: str = one_of(
        "batch", LP_REG_THRESHOLD_SCOPES,
        doc="where rho is taken. batch: over the whole mini-batch (every micro-batch and learner rank) by "
            "pi_old's log-probs, as the paper defines it; micro_batch: the lowest current log-probs of "
            "each micro-batch, as the authors' code does")
    lp_reg_coef: float = within(1.0, ge=0, doc="beta: weight of the KL pull towards the min-p proxy")
    # "none" is the paper's ablation without the filter (its Fig. 8). It is a key of its own,
    # not kappa = 0: that would keep every token too, but the behaviour proxy
    # (stale_policy=behaviour) would then renormalise over the K listed tokens only, while
    # "none" takes the exact path there (the sampled token's own log-prob), and a config
    # that says it reads as what it is.
    lp_reg_filter: str = one_of(
        "min_p", LP_REG_FILTERS,
        doc="what Lp-Reg's proxy removes from pi_old before it renormalises. min_p: the tokens below "
            "lp_reg_min_p times the most likely token's probability (the paper's proxy); none: nothing, "
            "so the proxy is pi_old itself at lp_reg_temperature (the paper's ablation without the "
            "filter; on-policy that makes the loss GRPO's, docs/algorithms.md)")
    lp_reg_min_p: float = within(
        0.02, gt=0, lt=1, doc="kappa: the min-p threshold of the proxy under lp_reg_filter=min_p; for no "
                              "filter set lp_reg_filter=none, not 0")
    lp_reg_temperature: float = within(
        1.0, gt=0, doc="temperature of the proxy (the min-p filter itself judges at temperature 1)")
    kl_type: str = one_of("low_var_kl", KL_TYPES, doc="KL estimator of Lp-Reg's pull towards the proxy")
    entropy_coef: float = doc(0.0, "weight of the entropy bonus (0: none)")
    kl_cov_ratio: float = within(
        0.002, ge=0, le=1, doc="KL-Cov: share of valid tokens, by highest advantage/log-prob covariance, "
                               "that pay kl_cov_coef * abs(log r)")
    kl_cov_coef: float = within(1.0, ge=0, doc="KL-Cov: weight of that penalty")
    clip_cov_ratio: float = within(
        0.0002, ge=0, le=1, doc="Clip-Cov: share of tokens, among those with covariance between "
                                "clip_cov_lb and clip_cov_ub, whose gradient is dropped")
    clip_cov_lb: float = doc(1.0, "Clip-Cov: lower bound of the covariance (below clip_cov_ub)")
    clip_cov_ub: float = doc(5.0, "Clip-Cov: upper bound of the covariance")
    entropy_top_frac: float = within(
        0.2, gt=0, le=1, doc="80/20: share of highest-entropy tokens that train")
    loss_scale_factor: float | None = within(
        None, gt=0, doc="the constant length seq-mean-token-sum-norm divides by; null: the padded length")
    rollout_correction: str = one_of(
        "none", ROLLOUT_CORRECTIONS,
        doc="correction for the gap between the policy that sampled (vLLM's log-probs) and pi_old. tis: "
            "each token's policy loss times the detached min(pi_old / pi_behaviour, cap); mis: drop every "
            "sequence whose geometric-mean ratio lies outside [1 / cap, cap]; none: no correction")
    rollout_correction_cap: float = within(2.0, gt=1, doc="cap of tis and mis")
    # "auto" picks behaviour off-policy because the learner's policy measured far worse
    # there on the demo (docs/algorithms.md); in lock-step the two are the same policy.
    stale_policy: str = one_of(
        "auto", STALE_POLICIES,
        doc="which policy is pi_old (the ratio's denominator, and the source of Lp-Reg's proxy) for "
            "samples of older weights. learner: its weights at the step's start (one no-grad pass per "
            "batch off-policy); behaviour: the generating policy, from vLLM's log-probs and top-K "
            "(rollout.top_logprobs); auto: learner in lock-step, behaviour when rollout.max_staleness >= 1")
    kl_loss_coef: float = within(
        0.0, ge=0, doc="weight of a KL to the initial (reference) model in the loss; 0 loads no reference")
    kl_loss_type: str = one_of("low_var_kl", KL_TYPES, doc="KL estimator of that term")


@dataclass
class VerifierConfig:
    """Rewards: the math verifier, or a user's reward function, in a pool of worker processes."""

    timeout_s: float = within(
        5.0, gt=0, doc="seconds per sample: a worker still scoring after them is killed, and the sample "
                       "scores 0")
    num_workers: int = within(2, ge=1, doc="scoring worker processes")
    reward_fn: str | None = doc(
        None, "a user-written reward, package.module:function, called as function(response: str, answer: "
              "str) -> float in the same pool; null: the math verifier")
    format_penalty: float = within(
        0.0, ge=0, doc="a response with no final answer scores -format_penalty (math reward only)")
    boxed_commands: list[str] = doc(
        ["boxed", "fbox"], "LaTeX commands, without the backslash, whose last one holds the final answer")
    answer_line_fallback: bool = doc(True, "with none of those, the last 'Answer: ...' line holds it")
    max_response_chars: int = within(
        100_000, ge=1, doc="only this many final characters of a response are searched for the answer")
    max_answer_chars: int = within(1_000, ge=1, doc="longer extracted answers score 0 without being parsed")
    worker_memory_mb: int = within(4096, ge=0, doc="address-space limit of each worker, in MiB (0: none)")
    # Without it, pushing down the end-of-sequence token on wrong answers costs nothing,
    # and responses drift to the length cap.
    truncated_reward: float | None = doc(
        0.0, "reward of a response cut off at rollout.max_response_tokens, whatever it holds; null scores "
             "it like any other")
    overlong_buffer_len: int = within(
        0, ge=0, doc="B of DAPO's soft overlong punishment: a response of L tokens beyond L_max - B, with "
                     "L_max = rollout.max_response_tokens, loses (L - (L_max - B)) / B * "
                     "overlong_penalty_factor (0: off)")
    overlong_penalty_factor: float = within(
        1.0, ge=0, doc="the most the overlong punishment takes, at L_max")


@dataclass
class ToolConfig:
    """Code the model writes during a rollout runs in a sandbox (rollout/tools/): as a
    user of its own, with no privileges, within these limits."""

    sandbox: str = one_of(
        "auto", TOOL_SANDBOXES,
        doc="bwrap: bubblewrap namespaces on top of the rlimits (no network, a private /tmp, only /usr "
            "and the interpreter's files visible); rlimits: resource limits and a user of its own only "
            "(no network where root can make a namespace); auto: bwrap when it is installed and runs "
            "here, rlimits otherwise, with a warning")
    timeout_s: float = within(
        10.0, gt=0, doc="wall-clock seconds one program may take; then it and every process it started die")
    cpu_time_s: int = within(5, ge=1, doc="CPU seconds each of its processes may use (RLIMIT_CPU)")
    memory_mb: int = within(1024, ge=16, doc="address space of each of its processes, in MiB (RLIMIT_AS)")
    max_processes: int = within(
        32, ge=1, doc="processes and threads it may have at once (RLIMIT_NPROC of its user)")
    max_file_mb: int = within(
        16, ge=1, doc="largest file it may write, in MiB (RLIMIT_FSIZE); under bwrap, all of its /tmp")
    max_output_chars: int = within(
        2000, ge=1, doc="output the model sees, in characters: the first and the last half, with a marker "
                        "that counts what was left out between them")
    max_concurrency: int = within(
        4, ge=1, le=256, doc="programs that run at once in one process; more wait for a free slot")
    python: str | None = doc(
        None, "the interpreter that runs the code; null: this Python when the sandbox user may run it, "
              "else python3 from /usr/local/bin, /usr/bin or /bin")
    tmp_dir: str | None = doc(
        None, "where each program's private temporary directory is made; null: the system's")
    plugins: dict[str, str] = doc(
        {}, "more tools by name, each package.module:function, called as function(code: str) -> str in the "
            "caller's process, outside the sandbox; python is built in")
    name: str = doc(
        "python", "the tool every code block goes to: python (the built-in sandbox) or a name of "
                  "tool.plugins")
    # Markers are matched on the decoded text, so any spelling works, across token boundaries.
    code_start: str = doc("```python", "opens a code block the model writes (rollout.max_turns > 0)")
    code_end: str = doc("```", "closes it: the response stops here and the code runs")
    output_start: str = doc("```output", "opens the observation block that holds the code's output")
    output_end: str = doc("```", "closes the observation block; the model continues after it")


@dataclass
class TrainerConfig:
    """The run: its steps, evaluation, checkpoints, restarts and metrics."""

    total_steps: int = within(80, ge=1, doc="training steps")
    run_name: str = doc("demo", "name of the run directory, output_dir/run_name")
    output_dir: str = doc("runs", "where run directories are made")
    seed: int = doc(0, "seed of the run: the prompt order, the sampling and the learners' random state")
    eval_every: int = within(
        0, ge=-1, doc="held-out evaluation before the first step, after the last, and every eval_every "
                      "steps in between (0: only before and after; -1: never)")
    eval_temperature: float = within(0.0, ge=0, doc="sampling temperature of evaluation (0: greedy)")
    eval_samples: int = within(
        1, ge=1, doc="k of mean@k and pass@k; 1 with temperature 0 is greedy accuracy")
    save_every: int = within(
        0, ge=0, doc="checkpoint every save_every steps and after the last (0: never), in the run "
                     "directory's checkpoints/step_N/: every learner rank's DeepSpeed state, the sampler "
                     "position, RNG states and a Hugging Face export")
    keep_last: int = within(2, ge=0, doc="newest checkpoints kept (0: all)")
    max_restarts: int = within(
        3, ge=0, doc="rebuilds of the learner group after a lost rank, each continuing from the newest "
                     "checkpoint (or the start, before the first); with save_every=0 the run stops instead")
    resume: str = doc(
        "never", "never: start from model.path; auto: continue from this run's newest complete checkpoint, "
                 "or start fresh when there is none; a path: continue from that checkpoint (a step_N "
                 "directory, or a checkpoints directory for its newest)")
    progress_bar: bool = doc(
        True, "a live progress bar when stdout is a terminal; one log line per step otherwise or when false")
    loggers: list[str] = doc(
        ["jsonl", "tensorboard"],
        "where each step's metrics go, from jsonl (metrics.jsonl; always on), tensorboard and wandb "
        "(Weights & Biases; WANDB_MODE=offline keeps it off the network), each in the run directory")
    project: str = doc("lpreg", "the W&B project")
    experiment: str | None = doc(None, "the W&B run name; null: trainer.run_name")
    watch_tokens: list[str] = doc(
        [], "strings whose share of the sampled tokens and mean sampled probability each step logs "
            "(watch/<string>/sampled_frac, watch/<string>/sampled_prob): each is watched as the token the "
            "tokenizer makes of it, with and without a leading space; a string of several tokens by its "
            "first token. Under lp_reg also its share of the regularised tokens "
            "(watch/<string>/regularized_frac; docs/algorithms.md)")
    watch_hist_every: int = within(
        0, ge=0, doc="steps between two histograms of each watched token's sampled probabilities "
                     "(watch/<string>/prob_hist, in metrics.jsonl; 0: none)")


@dataclass
class RayConfig:
    """The Ray cluster, and how the actors are placed on it."""

    address: str | None = doc(
        None, "the cluster to join; null: RAY_ADDRESS when set, otherwise a private local cluster")
    num_cpus: int | None = within(
        None, ge=1, doc="logical CPUs of the private local cluster; null sizes it to fit every actor")
    placement_strategy: str = one_of(
        "PACK", PLACEMENT_STRATEGIES, doc="how each placement group spreads its bundles over nodes")
    colocate: bool = doc(
        False, "true: rollout worker i and learner rank i share bundle i (with fractional GPUs, e.g. 0.5 "
               "each, one GPU); false: a placement group each, so neither takes the other's CPUs or GPUs")
    placement_timeout_s: float = within(
        120.0, gt=0, doc="seconds to wait for the placement groups before naming what could not be placed")
    node_wait_s: float = within(
        600.0, gt=0, doc="seconds the run waits for room after a lost node took actors it needs (a learner "
                         "rank, or every rollout worker) before it stops with one line; room on the nodes "
                         "left needs no wait, and a node that joins in time is used")


@dataclass
class LpregConfig:
    """Every key of lpreg, by section."""

    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    learner: LearnerConfig = section(LearnerConfig)
    algorithm: AlgorithmConfig = section(AlgorithmConfig)
    verifier: VerifierConfig = section(VerifierConfig)
    tool: ToolConfig = section(ToolConfig)
    trainer: TrainerConfig = section(TrainerConfig)
    ray: RayConfig = section(RayConfig)
