"""The one structured config schema of lpreg.

Every default lives here. The defaults describe the embedded demo: a local Ray, a tiny
model built on the spot, CPU only. Recipes in ``conf/recipes/`` and command-line
overrides change values; they cannot add keys the schema does not know.
"""

from __future__ import annotations

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
STALE_POLICIES = ("auto", "learner", "behaviour")
SYNTHETIC_KINDS = ("sum", "linear", "fraction")
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


def one_of(default: Any, choices: tuple) -> Any:
    """A key that takes one of ``choices``; the loader refuses anything else."""
    return field(default=default, metadata={"choices": choices})


def within(default: Any, **bounds: float) -> Any:
    """A numeric key with bounds (``ge``, ``gt``, ``le``, ``lt``); ``None`` passes when the
    key's type allows it."""
    return field(default=default, metadata={"range": Range(**bounds)})


@dataclass
class TinyModelConfig:
    """Shape of the model built locally when ``model.path`` is not given."""

    num_layers: int = within(4, ge=1)
    hidden_size: int = within(128, ge=1)
    num_heads: int = within(2, ge=1)  # head_dim = hidden / heads = 64: CPU attention rejects smaller heads
    num_kv_heads: int = within(2, ge=1)
    intermediate_size: int = within(256, ge=1)
    max_position_embeddings: int = within(256, ge=1)
    seed: int = 0
    # Supervised warm start on the synthetic task (data.synthetic). It stops early on
    # purpose, once greedy accuracy on a probe set reaches the target: RL needs a model
    # that is right sometimes, with room left to improve. 0 steps keeps the random init.
    warm_start_steps: int = within(2000, ge=0)  # at most
    warm_start_target_accuracy: float = within(0.25, gt=0, le=1)
    warm_start_probe_every: int = within(10, ge=1)
    warm_start_probe_problems: int = within(200, ge=1)
    warm_start_batch_size: int = within(64, ge=1)
    # A linear warm-up and a moderate rate keep the sudden jump a smooth climb: at 2e-3
    # without warm-up some seeds oscillate for thousands of steps and never make it.
    warm_start_lr: float = within(1e-3, gt=0)
    warm_start_warmup_steps: int = within(100, ge=0)


@dataclass
class ModelConfig:
    # A Hugging Face model directory. None bootstraps the tiny model (once) into cache_dir.
    path: str | None = None
    cache_dir: str = "models"
    # float32 keeps vLLM's and the learner's log-probs equal on CPU; bfloat16 for GPUs.
    dtype: str = one_of("float32", DTYPES)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SyntheticTaskConfig:
    """Generated problems with verifiable answers; the operand range is the difficulty knob."""

    # "sum": a+b(+c...)=   "linear": solve a*x+b=c for the integer x
    # "fraction": a/b+c/d(+...)= in lowest terms
    kind: str = one_of("sum", SYNTHETIC_KINDS)
    num_operands: int = within(2, ge=2)
    min_operand: int = 10
    max_operand: int = 99
    seed: int = 0


@dataclass
class DataConfig:
    # JSONL file of {"prompt", "answer"} rows. None uses the synthetic task.
    train_path: str | None = None
    # Held-out problems for evaluation; None uses fresh synthetic ones.
    eval_path: str | None = None
    # Where a row keeps its prompt and its reference answer: dotted paths into the row
    # (e.g. "question", "reward_model.ground_truth"). None: "prompt", and "answer" or,
    # in a row without one, verl's "reward_model.ground_truth".
    prompt_key: str | None = None
    answer_key: str | None = None
    prompts_per_step: int = within(32, ge=1)
    max_prompt_tokens: int = within(64, ge=1)
    # How prompts meet the tokenizer's chat template. "auto": through it whenever the
    # tokenizer has one (a plain string becomes one user message), as they are otherwise;
    # "always": the template is required; "never": plain strings as they are, which is
    # what base models trained on raw text expect (chat-message prompts still need it).
    chat_template: str = one_of("auto", CHAT_TEMPLATE_MODES)
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    num_synthetic_train: int = within(20000, ge=1)
    num_synthetic_eval: int = within(500, ge=0)


@dataclass
class RolloutConfig:
    num_workers: int = within(2, ge=1)
    samples_per_prompt: int = within(8, ge=1)  # n: the size of each GRPO group
    # The learner scores tokens at this temperature, so it must be above 0; greedy
    # decoding is for evaluation (trainer.eval_temperature).
    temperature: float = within(1.0, gt=0)
    top_p: float = within(1.0, gt=0, le=1)
    max_response_tokens: int = within(16, ge=1)
    cpus_per_worker: float = within(1.0, ge=0)
    gpus_per_worker: float = within(0.0, ge=0)
    tensor_parallel_size: int = within(1, ge=1)
    # On CPU vLLM reads this as a fraction of the NUMA node's RAM; 0.92 fails at start-up.
    gpu_memory_utilization: float = within(0.2, gt=0, le=1)
    # KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = within(1, ge=1)
    max_model_len: int = within(256, ge=1)
    enforce_eager: bool = True
    # A worker that does not answer the driver's poll (a heartbeat, normally answered
    # within a second), or makes no progress on the work it holds, for this many seconds
    # is declared hung: it is killed and replaced, and its requests go elsewhere.
    timeout_s: float = within(120.0, gt=0)
    # Seconds to wait for an engine to start.
    startup_timeout_s: float = within(600.0, gt=0)
    # Sequences one engine generates at once (vLLM's max_num_seqs). Groups beyond what
    # the workers hold wait on the driver and go to whichever worker frees up first.
    max_num_seqs: int = within(256, ge=1)
    # Weight versions a sample may lag the learner when it is trained on. 0: lock-step
    # (generate, then train, then sync). k >= 1: the workers generate up to k steps ahead
    # while the learners train; a sample more than k versions old is dropped and counted.
    max_staleness: int = within(0, ge=0)
    # At a weight update, samples still generating pause and continue under the new
    # weights (their tokens so far become part of the prompt) instead of finishing under
    # the old ones first. Every token records the version that produced it.
    partial_rollout: bool = False
    # Replacements of lost or hung rollout workers over the whole run; one more loss
    # stops the run with an error that says what happened.
    max_restarts: int = within(3, ge=0)
    # The K most likely tokens at each position that vLLM reports when the run needs the
    # generating policy's distribution (algorithm.stale_policy=behaviour with lp_reg);
    # unused otherwise. The min-p proxy is exact where they include every token it keeps.
    top_logprobs: int = within(20, ge=0)
    # How weights reach the engines. "object_store": learner rank 0 puts them in Ray's
    # object store and every worker reloads in place. "broadcast": learner rank 0 sends
    # them straight into every engine through vLLM's weight-transfer API, one broadcast
    # per push (NCCL on GPUs, gloo on CPUs; "nccl" is its old name). "auto": broadcast
    # when the rollout workers have GPUs of their own, the object store otherwise.
    weight_sync: str = one_of("auto", WEIGHT_SYNC_TRANSPORTS)
    # Bytes per broadcast bucket, in MiB: the sender packs tensors into buckets of about
    # this size, so neither side ever holds more than a bucket beyond the model.
    broadcast_bucket_mb: int = within(256, ge=1)
    # After every sync, read back a checksum of every engine's weights and log it.
    verify_weight_sync: bool = False


@dataclass
class LearnerConfig:
    num_workers: int = within(2, ge=1)
    zero_stage: int = one_of(0, ZERO_STAGES)
    micro_batch_size: int = within(32, ge=1)  # sequences per forward pass on one learner
    lr: float = within(2e-4, gt=0)
    weight_decay: float = within(0.0, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = within(1.0, ge=0)  # 0: no clipping
    cpus_per_worker: float = within(1.0, ge=0)
    gpus_per_worker: float = within(0.0, ge=0)
    # "auto": nccl when the learner sees a GPU, gloo otherwise.
    dist_backend: str = one_of("auto", DIST_BACKENDS)
    timeout_s: float = within(600.0, gt=0)
    startup_timeout_s: float = within(600.0, gt=0)
    # Micro-batches by a token budget instead of micro_batch_size: at most this many padded
    # tokens (rows x (longest prompt + longest response)) per forward, sequences grouped by
    # length. Long-tailed response lengths then cost memory by the budget, not by the longest
    # response times the count. 0: count-based micro-batches of micro_batch_size.
    max_tokens_per_micro_batch: int = within(0, ge=0)
    # Recompute each decoder layer's activations in the backward pass instead of keeping
    # them: far less activation memory for about one more forward of compute.
    gradient_checkpointing: bool = False
    # Positions whose logits exist at once: the output projection and the log-prob, entropy
    # and Lp-Reg proxy run chunk by chunk, forward and backward, so no response x vocabulary
    # logits tensor is ever whole. 0: the whole micro-batch's logits at once.
    logits_chunk_tokens: int = within(0, ge=0)
    # Learning rate over optimizer steps: "constant", "linear" or "cosine" decay to
    # min_lr_ratio * lr, after a linear warm-up of lr_warmup_steps.
    lr_scheduler: str = one_of("constant", LR_SCHEDULERS)
    lr_warmup_steps: int = within(0, ge=0)
    min_lr_ratio: float = within(0.0, ge=0, le=1)


@dataclass
class AlgorithmConfig:
    advantage: str = one_of("grpo", ADVANTAGE_ESTIMATORS)
    loss: str = one_of("lp_reg", POLICY_LOSSES)
    loss_agg_mode: str = one_of("token-mean", LOSS_AGG_MODES)
    # The ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high].
    clip_ratio_low: float = within(0.2, ge=0, le=1)
    clip_ratio_high: float = within(0.28, ge=0)
    # Dynamic sampling (DAPO): drop every group whose rewards are all equal (it has zero
    # advantage) and generate more groups on fresh prompts, until data.prompts_per_step
    # groups are kept or max_generation_rounds rounds have run; then train on what was kept.
    filter_groups: bool = False
    max_generation_rounds: int = within(3, ge=1)
    # Mini-batches per rollout batch and passes over it. 1 and 1 is on-policy: the
    # old log-probs and the Lp-Reg proxy then come from the training forward pass itself.
    mini_batches_per_step: int = within(1, ge=1)
    epochs_per_step: int = within(1, ge=1)
    lp_reg_neg_frac: float = within(0.01, ge=0, le=1)  # rho
    lp_reg_pos_frac: float = within(0.0, ge=0, le=1)
    # Where rho is taken. "batch": over the whole mini-batch (every micro-batch and learner
    # rank), by pi_old's log-probs, as the paper defines it: the regularised tokens do not
    # depend on micro_batch_size, max_tokens_per_micro_batch or the number of learners.
    # "micro_batch": the lowest current log-probs of each micro-batch, as the authors' code
    # does; reproduces its numbers exactly.
    lp_reg_threshold_scope: str = one_of("batch", LP_REG_THRESHOLD_SCOPES)
    lp_reg_coef: float = within(1.0, ge=0)  # beta
    lp_reg_min_p: float = within(0.02, gt=0, lt=1)  # kappa
    lp_reg_temperature: float = within(1.0, gt=0)
    kl_type: str = one_of("low_var_kl", KL_TYPES)
    entropy_coef: float = 0.0
    # KL-Cov: fraction of valid tokens (highest advantage/log-prob covariance) that pay
    # kl_cov_coef * |log r|.
    kl_cov_ratio: float = within(0.002, ge=0, le=1)
    kl_cov_coef: float = within(1.0, ge=0)
    # Clip-Cov: fraction of tokens, with covariance in (lb, ub), whose gradient is dropped.
    clip_cov_ratio: float = within(0.0002, ge=0, le=1)
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    # 80/20: fraction of highest-entropy tokens that train.
    entropy_top_frac: float = within(0.2, gt=0, le=1)
    # seq-mean-token-sum-norm divides by this constant length; None: the padded length.
    loss_scale_factor: float | None = within(None, gt=0)
    # Correction for the gap between the policy that sampled (vLLM's log-probs, the
    # behaviour policy) and pi_old: "tis" multiplies each token's policy loss by the
    # detached min(pi_old / pi_behaviour, cap); "mis" drops every sequence whose
    # geometric-mean ratio lies outside [1 / cap, cap]. "none": no correction.
    rollout_correction: str = one_of("none", ROLLOUT_CORRECTIONS)
    rollout_correction_cap: float = within(2.0, gt=1)
    # Which policy is pi_old (the ratio's denominator, and the source of Lp-Reg's min-p
    # proxy) for samples generated by older weights. "learner": the learner's weights at
    # the start of the step (free on-policy; one no-grad pass per batch off-policy).
    # "behaviour": the generating policy itself: vLLM's log-probs, and the proxy from its
    # top-K log-probs (rollout.top_logprobs); never an extra pass. "auto": learner in
    # lock-step (the two are then the same policy), behaviour when rollout.max_staleness
    # >= 1, where the learner's policy measured far worse on the demo (README).
    stale_policy: str = one_of("auto", STALE_POLICIES)
    # KL to the initial model ("reference"), added to the loss with this weight; 0 loads
    # no reference model. The Lp-Reg recipes use none.
    kl_loss_coef: float = within(0.0, ge=0)
    kl_loss_type: str = one_of("low_var_kl", KL_TYPES)


@dataclass
class VerifierConfig:
    # Hard limit per sample: a worker still scoring after this is killed; the sample scores 0.
    timeout_s: float = within(5.0, gt=0)
    num_workers: int = within(2, ge=1)
    # "package.module:function" for a user-written reward; None uses the math verifier.
    # Called as function(response: str, answer: str) -> float, in the same worker pool.
    reward_fn: str | None = None
    # Reward of a response with no final answer is -format_penalty (math reward only).
    format_penalty: float = within(0.0, ge=0)
    # The final answer is the last \boxed{...} (or another of these commands) ...
    boxed_commands: list[str] = field(default_factory=lambda: ["boxed", "fbox"])
    # ... else the last "Answer: ..." line.
    answer_line_fallback: bool = True
    # Only this many final characters of a response are searched for the answer.
    max_response_chars: int = within(100_000, ge=1)
    # Longer extracted answers score 0 without being parsed.
    max_answer_chars: int = within(1_000, ge=1)
    # Address-space limit of each worker process, in MiB; 0 for none.
    worker_memory_mb: int = within(4096, ge=0)
    # Reward of a response cut off at rollout.max_response_tokens, whatever it contains;
    # None scores it like any other. Without this, pushing down the end-of-sequence token
    # on wrong answers costs nothing, and responses drift to the length cap.
    truncated_reward: float | None = 0.0
    # DAPO's soft overlong punishment: a response of L tokens, with L_max =
    # rollout.max_response_tokens and B = overlong_buffer_len, gets
    # -(L - (L_max - B)) / B * overlong_penalty_factor added to its reward once
    # L > L_max - B (at most -overlong_penalty_factor, at L_max); 0 turns it off.
    overlong_buffer_len: int = within(0, ge=0)
    overlong_penalty_factor: float = within(1.0, ge=0)


@dataclass
class ToolConfig:
    """Code the model writes during a rollout runs in a sandbox (rollout/tools/): as a
    user of its own, with no privileges, within these limits."""

    # "bwrap": bubblewrap namespaces on top of the rlimits (no network, a private /tmp,
    # only /usr and the interpreter's files visible); "rlimits": resource limits and a
    # user of its own only (and no network where root can make a namespace). "auto":
    # bwrap when it is installed and runs here, rlimits otherwise, with a warning.
    sandbox: str = one_of("auto", TOOL_SANDBOXES)
    # Wall-clock seconds one program may take; then it and every process it started die.
    timeout_s: float = within(10.0, gt=0)
    # CPU seconds each of its processes may use (RLIMIT_CPU).
    cpu_time_s: int = within(5, ge=1)
    # Address space of each of its processes, in MiB (RLIMIT_AS).
    memory_mb: int = within(1024, ge=16)
    # Processes and threads it may have at once (RLIMIT_NPROC of its user).
    max_processes: int = within(32, ge=1)
    # Largest file it may write, in MiB (RLIMIT_FSIZE); under bwrap, all of its /tmp.
    max_file_mb: int = within(16, ge=1)
    # Output the model sees, in characters: the first and the last half, with a marker
    # that counts what was left out between them.
    max_output_chars: int = within(2000, ge=1)
    # Programs that run at once in one process; more wait for a free slot.
    max_concurrency: int = within(4, ge=1, le=256)
    # The interpreter that runs the code. None: this Python when the sandbox user may run
    # it, else python3 from /usr/local/bin, /usr/bin or /bin.
    python: str | None = None
    # Where each program's private temporary directory is made; None: the system's.
    tmp_dir: str | None = None
    # More tools by name, each "package.module:function", called as function(code: str)
    # -> str in the caller's process, outside the sandbox. "python" is built in.
    plugins: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    total_steps: int = within(80, ge=1)
    run_name: str = "demo"
    output_dir: str = "runs"
    seed: int = 0
    # Held-out evaluation: before the first and after the last step, and every
    # eval_every steps in between (0: only before and after; -1: never).
    eval_every: int = within(0, ge=-1)
    eval_temperature: float = within(0.0, ge=0)  # 0 is greedy
    eval_samples: int = within(1, ge=1)  # k of mean@k / pass@k; 1 with temperature 0 is greedy accuracy
    # Checkpoints in <output_dir>/<run_name>/checkpoints/step_<N>/ every save_every steps
    # and after the last step (0: never): DeepSpeed state of every learner rank, the
    # sampler position, RNG states and a Hugging Face export. The newest keep_last
    # stay (0: all).
    save_every: int = within(0, ge=0)
    keep_last: int = within(2, ge=0)
    # A lost learner rank: the learner group is rebuilt and the run continues from the
    # newest checkpoint (or from the start, before the first one), at most this many
    # times. With save_every=0 there is nothing to continue from: the run stops.
    max_restarts: int = within(3, ge=0)
    # "never": start from model.path. "auto": continue from this run's newest complete
    # checkpoint, or start fresh when there is none. A path: continue from that
    # checkpoint (a step_<N> directory, or a checkpoints directory for its newest).
    resume: str = "never"
    # A live progress bar when stdout is a terminal; one log line per step otherwise.
    progress_bar: bool = True
    # Where each step's metrics go, from jsonl (metrics.jsonl; always on), tensorboard
    # (<run dir>/tensorboard) and wandb (Weights & Biases, files under <run dir>/wandb;
    # WANDB_MODE=offline keeps it off the network).
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    # The W&B project and run name; None names the run after trainer.run_name.
    project: str = "lpreg"
    experiment: str | None = None


@dataclass
class RayConfig:
    # None: RAY_ADDRESS when set, otherwise a private local cluster.
    address: str | None = None
    # Logical CPUs of the private local cluster; None sizes it to fit every actor.
    num_cpus: int | None = within(None, ge=1)
    # How each placement group spreads its bundles over nodes: PACK, SPREAD,
    # STRICT_PACK or STRICT_SPREAD.
    placement_strategy: str = one_of("PACK", PLACEMENT_STRATEGIES)
    # False: one placement group for the rollout workers and another for the learners,
    # so neither can take the other's CPUs or GPUs. True: rollout worker i and learner
    # rank i share bundle i; with fractional GPUs (e.g. 0.5 each) they share one GPU.
    colocate: bool = False
    # Seconds to wait for the placement groups before naming what could not be placed.
    placement_timeout_s: float = within(120.0, gt=0)
    # Seconds the run waits for a node with room after a lost node took actors it needs
    # (a learner rank; or every rollout worker) before it stops with one line. Room for
    # them on the nodes left needs no wait; a node that joins within this time does.
    node_wait_s: float = within(600.0, gt=0)


@dataclass
class LpregConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    tool: ToolConfig = field(default_factory=ToolConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
