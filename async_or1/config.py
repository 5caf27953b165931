"""Typed, documented, strict configuration.

Every field carries its documentation in ``metadata["doc"]``; ``describe()`` prints
them. Loading is strict: an unknown or misspelt key is an error that names the key
and suggests the closest valid one. YAML files plus dotted overrides
(``algo.clip_high=0.265``) resolve to one ``Config``.

Units live in the names: ``prompts_per_step`` counts prompts (= groups) per optimizer
step, summed over all learner ranks (global); ``samples_per_prompt`` is the group size
G; ``micro_batch_tokens_per_rank`` is a per-rank token budget.

This module imports only the standard library and PyYAML so that the CLI can
parse and dry-run without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, with the dotted path of the offending field."""


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a documentation string (and a copy of mutable defaults)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    path: str = _f("embedded", "Local path of a Hugging Face causal LM (loaded with from_pretrained), or 'embedded' "
                   "for the tiny model this package builds and caches on first use, or 'embedded-small' for the "
                   "27M-parameter one on the long-tailed count-up task (configs/cpu-small.yaml).")
    tokenizer_path: str = _f("", "Tokenizer path; empty means the model path.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Parameter dtype of the learner's master copy "
                                                           "and of the generators' weights.")
    trust_remote_code: bool = _f(False, "Passed to from_pretrained; leave off unless you trust the checkpoint.")


@dataclass
class StageConfig:
    steps: int = _f(100, "Training steps (rollout batches, versions) in this stage; each makes "
                         "learner.mini_batches_per_step × learner.passes_per_batch optimizer steps.")
    max_response_tokens: int = _f(8192, "Maximum new tokens per sampled response in this stage (the paper's "
                                        "context length schedule: 8K, 16K, 32K).")
    prompts_per_step: int = _f(256, "Prompts (= groups) consumed per training step (the paper's rollout batch "
                                    "D_R), global over learner ranks.")
    samples_per_prompt: int = _f(16, "Responses sampled per prompt (group size G for GRPO).")


@dataclass
class DataConfig:
    train_files: list = _f([], "Training rows (parquet or JSONL) in the Skywork-OR1-RL-Data layout. Empty with "
                              "model.path='embedded' means the embedded task's train split.")
    eval_files: list = _f([], "Held-out rows for periodic evaluation (avg@k). Empty with the embedded model means "
                             "its held-out split.")
    on_bad_row: Literal["error", "skip"] = _f("error", "A row that cannot be used: 'error' stops with the file, "
                                                       "row and field named; 'skip' drops it and counts it.")
    shuffle: bool = _f(True, "Shuffle prompts each epoch (seeded, resumable).")
    max_prompt_tokens: int = _f(2048, "Prompts longer than this after the chat template are dropped when the data "
                                      "is loaded, before anything starts (counted as prompt_too_long; eval rows too).")
    difficulty_model: str = _f("", "If set, filter on extra_info.model_difficulty[difficulty_model] (correct count "
                                   "out of difficulty_n): keep rows strictly between 0 and difficulty_n.")
    difficulty_n: int = _f(16, "Rollouts per problem behind the stored model_difficulty counts.")
    online_filter: bool = _f(True, "At each stage boundary drop prompts the policy solved N/N during the previous "
                                   "stage (paper section 3.1).")
    abilities: list = _f(["math", "code"], "Row abilities to train on.")


@dataclass
class EntropyConfig:
    enabled: bool = _f(True, "Adaptive entropy control (paper section 3.2.5). Off means entropy_coef = coef_init.")
    target: float = _f(0.2, "Target entropy tgt (nats per token).")
    delta: float = _f(0.005, "Coefficient step Δ per training step (paper 0.005; released scripts 1e-4).")
    coef_init: float = _f(0.0, "Initial coefficient c.")
    coef_min: float = _f(0.0, "Lower clip of c.")
    coef_max: float = _f(1.0e9, "Upper clip of c (released scripts: 5e-3).")


@dataclass
class AlgoConfig:
    clip_low: float = _f(0.2, "ε_low of the clipped ratio: clip(ratio, 1 − ε_low, 1 + ε_high).")
    clip_high: float = _f(0.2, "ε_high, the clip-higher knob; 0.2 is plain PPO, the paper found 0.25–0.265 helped.")
    temperature: float = _f(1.0, "Sampling temperature; the learner divides logits by it too so that log-probs "
                                 "match the sampling distribution.")
    top_p: float = _f(1.0, "Nucleus sampling; anything below 1 makes behaviour log-probs differ from the "
                           "learner's, so keep 1.0 for on-policy-correct RL.")
    top_k: int = _f(-1, "Top-k sampling; -1 disables (see top_p).")
    adv_eps: float = _f(1e-6, "ε in A = (r − mean) / (std + ε).")
    kl_coef: float = _f(0.0, "β of the KL penalty β·KL(π_θ ‖ π_ref) per response token, π_ref a frozen copy of "
                             "the initial policy (model.path), loaded only when β > 0 and partitioned like the "
                             "policy under ZeRO-3. 0 (the MAGIC default, paper section 3.2.6) loads nothing.")
    kl_estimator: Literal["k3", "k1"] = _f("k3", "Per-token KL estimator of the penalty: 'k3' = e^(ℓ_ref−ℓ_θ) − "
                                               "(ℓ_ref−ℓ_θ) − 1 ≥ 0 (GRPO's), 'k1' = ℓ_θ − ℓ_ref.")
    correction: Literal["none", "tis", "seq_is", "mis", "icepop", "m2po"] = _f("none", "Off-policy correction "
        "(formulas and sources: async_or1/algo/corrections.py; ρ = π_prox/π_behav per token, π_prox the learner "
        "before the step's first update). 'none': PPO ratio against the generator's log-probs, no weight. "
        "Every other option ratios against π_prox and weights the token loss: 'tis' min(ρ, is_cap) (this is "
        "decoupled PPO; is_cap=inf is its untruncated form); 'seq_is' min(Πρ, is_cap) per response; 'mis' Πρ, "
        "the response masked outside [mis_low, mis_high]; 'icepop' ρ, the token masked outside [icepop_low, "
        "icepop_high]; 'm2po' ρ with the tokens of largest (log ρ)² masked until their mean is <= m2po_threshold, "
        "and no PPO clip.")
    is_cap: float = _f(2.0, "C of 'tis' (per token) and 'seq_is' (per response): the behaviour weight is "
                            "min(ratio, C) (Yao et al. 2025 and verl use 2). inf: untruncated.")
    mis_low: float = _f(0.5, "'mis': lower bound of the response's Πρ; below it the response is masked.")
    mis_high: float = _f(2.0, "'mis': upper bound of the response's Πρ (verl's Seq-MIS: [0.5, 2]).")
    icepop_low: float = _f(0.5, "'icepop': lower bound α of the token's ρ; outside [α, β] the token is masked.")
    icepop_high: float = _f(5.0, "'icepop': upper bound β (Ring-1T: [0.5, 5]).")
    m2po_threshold: float = _f(0.04, "'m2po': τ_M2, the largest allowed mean (log ρ)² over the step's kept tokens "
                                     "(M2PO paper: 0.04).")
    truncated_mask: Literal["none", "mask_truncated"] = _f("none", "Advantage mask for truncated responses "
                                                                    "(paper section 3.2.3); off by default.")
    reject_zero_advantage: bool = _f(True, "Reject groups whose rewards all agree (std 0): they carry no signal.")
    entropy: EntropyConfig = _f(EntropyConfig(), "Adaptive entropy control.")


@dataclass
class RewardsConfig:
    workers: int = _f(2, "Reward worker processes per generator.")
    math_timeout_s: float = _f(10.0, "Hard wall-clock limit of one math verification (worker killed past it).")
    code_timeout_s: float = _f(10.0, "Wall-clock limit of one code sandbox run (all tests of a sample).")
    code_memory_mb: int = _f(4096, "Address-space limit of the sandboxed program.")
    require_think: bool = _f(True, "A response without '</think>' was truncated and scores 0 (reasoning models).")
    code_isolation: Literal["namespaces", "plain"] = _f("namespaces", "Isolation the code sandbox must have, "
        "checked by a self-check at start: 'namespaces' (private file system, no network, own pid namespace; as root, "
        "or in a user namespace) or 'plain' (rlimits and a scratch dir only, for trusted code). With less, training on code rows "
        "refuses to start.")


@dataclass
class GenerationConfig:
    engine: Literal["torch", "sglang"] = _f("torch", "Inference engine of the generators.")
    num_generators: int = _f(1, "Generator processes (each one engine).")
    devices: list = _f([], "One device set per generator: GPU ids like '0,1' on GPU machines, CPU core sets like "
                           "'0' or '0-3' here. Empty: no pinning. With launch.backend=ray, CPU core sets pin each "
                           "process on the node it lands on and GPU ids are not used (Ray assigns the GPUs).")
    max_batch_size: int = _f(64, "Concurrent sequences per engine (torch engine slots; SGLang decides its own).")
    prompts_per_lease: int = _f(4, "Prompts a generator leases at once.")
    weight_update: Literal["between_requests", "in_flight"] = _f("in_flight", "Load new weights between decode steps "
        "and go on ('in_flight'; tokens after the switch carry the new version), or only when no request runs.")
    sglang_mem_fraction: float = _f(0.85, "SGLang mem_fraction_static.")
    sglang_tp_size: int = _f(1, "SGLang tensor-parallel size per engine (the engine holds that many ranks of the "
                                "weight group).")
    sglang_pause_mode: Literal["retract", "in_place"] = _f("retract", "How an SGLang engine (0.5.10+) holds running "
        "requests during an in-flight weight update: 'retract' (their KV is recomputed with the new weights after it) "
        "or 'in_place' (KV kept). SGLang <= 0.5.5 cannot pause without aborting: the update waits for them instead.")
    sglang_weight_layout: Literal["flattened_bucket", "per_tensor"] = _f("flattened_bucket", "How weights reach "
        "SGLang engines: SGLang's FlattenedTensorBucket, one broadcast per bucket (SGLang 0.5.10+), or one broadcast "
        "per tensor (every version). Either way one update call per learner.bucket_mb bucket.")
    seed: int = _f(0, "Sampling seed base; generator i uses seed + i.")
    max_restarts: int = _f(3, "A generator process that dies is restarted (its leased prompts re-issued) up to "
                              "this many times before the run stops.")


@dataclass
class LearnerConfig:
    devices: list = _f([], "Device per learner rank (GPU id or CPU core set); its length is the number of ranks. "
                           "Empty: one rank, unpinned. With launch.backend=ray, CPU core sets pin each rank on the "
                           "node it lands on and GPU ids only count ranks (Ray assigns the GPUs).")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3.")
    lr: float = _f(1e-6, "AdamW learning rate (constant; the paper uses 1e-6).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    grad_clip: float = _f(1.0, "Gradient norm clip.")
    micro_batch_tokens_per_rank: int = _f(16384, "Token budget of one micro-batch on one rank (prompt + response "
                                                 "tokens); sequences are packed up to it, never split.")
    logprob_chunk_tokens: int = _f(1024, "Tokens per chunk of the memory-bounded log-prob/entropy computation.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward.")
    mini_batches_per_step: int = _f(1, "N_SGD of the paper (section 4): each training step's rollout batch "
        "(prompts_per_step groups) is split into this many mini-batches of whole groups, one optimizer step each "
        "(mini-batch = prompts_per_step / N prompts; Table 10's 256/128 is 2). Must divide every stage's "
        "prompts_per_step. The version still counts training steps (see buffer.max_staleness).")
    passes_per_batch: int = _f(1, "N_reuse of the paper: passes over the step's mini-batches, in the same order; a "
        "step makes mini_batches_per_step × passes_per_batch optimizer steps. With more than one, the proximal "
        "log-probs (the weights before the step's first update) are computed once, without gradients, before it.")
    broadcast_every_steps: int = _f(1, "Broadcast weights to generators every N training steps (versions).")
    bucket_mb: int = _f(256, "Weight broadcast bucket size in MiB.")
    checkpoint_every_steps: int = _f(0, "Save a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "Resumable checkpoints kept on disk (complete ones; partial .tmp directories "
                                  "are never counted or loaded).")
    stop_grace_s: float = _f(600.0, "After Ctrl-C (or SIGTERM to `async-or1 train`), how long learners may take to "
                                    "finish the step and checkpoint before they are killed. A 32B ZeRO-3 save can "
                                    "take minutes: size it to your checkpoint time.")


@dataclass
class BufferConfig:
    max_staleness: int = _f(1, "η: the one staleness bound, in versions. A version is one training step: one rollout "
        "batch of prompts_per_step groups consumed, whatever its mini_batches_per_step × passes_per_batch optimizer "
        "steps; weights are broadcast and tokens stamped in the same unit. A prompt is leased only while "
        "accepted + running < (η + version + 1) × prompts_per_step, for the step whose slot it fills, starting on "
        "weights at least that step − η; the learner takes groups by deadline and waits for a due one, so no group "
        "is trained more than η versions behind (one that is, e.g. from a generator ignoring min_version, is "
        "dropped: reason 'stale'). 0 is on-policy.")
    wait_timeout_s: float = _f(600.0, "The learner fails loudly if no batch completes within this time.")


@dataclass
class TransportConfig:
    kind: Literal["zmq", "inproc"] = _f("zmq", "'zmq': generators and learner ranks are processes talking over "
        "ZeroMQ, weights over torch.distributed. 'inproc': the whole loop in one process (learner on the main "
        "thread, generators on threads, queues and shared memory) to step through under a debugger.")
    host: str = _f("127.0.0.1", "Address the learner binds its sockets to (use 0.0.0.0 or a NIC address for "
                                "generators on other nodes).")
    learner_address: str = _f("127.0.0.1", "Address generators connect to.")
    port: int = _f(0, "Learner's ZeroMQ ROUTER port; 0 picks a free port (single-node launch only).")
    weights_port: int = _f(0, "TCP port of the weight broadcast group's rendezvous; 0 picks a free port.")
    weights_backend: Literal["auto", "nccl", "gloo"] = _f("auto", "Backend of the weight broadcast group. 'auto': "
        "NCCL on GPU machines, gloo on CPU. 'gloo' on GPUs sends through host memory: needed when a generator shares "
        "the learner's GPU (NCCL refuses two ranks on one device, e.g. scripts/gpu_smoke.sh).")
    high_water_mark: int = _f(0, "ZeroMQ send/receive high-water mark in messages; 0 is unlimited so nothing is "
                                 "dropped (senders block on the kernel buffer instead).")
    max_message_mb: int = _f(1024, "Frames larger than this are rejected and counted.")
    heartbeat_s: float = _f(5.0, "Generator heartbeat period.")
    curve: bool = _f(True, "Authenticate every generator with ZeroMQ CURVE (one key pair per generator, made at "
                           "launch; a peer without this run's key is refused at the handshake and counted). false: "
                           "plain TCP, where any process that reaches the port can connect: debugging only.")
    keys_dir: str = _f("", "Directory of the run's CURVE keys. Empty: <run_dir>/keys, made fresh by `async-or1 "
                           "train`. Multi-node (--role): make them once with `async-or1 keys --dir D --generators N`, "
                           "copy D to every node (mode 0600 kept) and set this to D.")
    weights_timeout_s: float = _f(120.0, "Weight group: how long a rendezvous or one broadcast may take. A generator "
                                         "waiting for a broadcast that a dying peer broke gives up after this long "
                                         "and rejoins the re-formed group.")
    weights_attempts: int = _f(3, "Tries to (re-)form the weight group before one broadcast (a member may die "
                                  "during the rendezvous). A broadcast that fails part-way is owed and streamed "
                                  "again from the learner's wait phase.")
    generator_timeout_s: float = _f(60.0, "A generator silent this long is declared dead and its leases re-issued "
                                          "(one whose connection closes is declared lost at once).")
    lease_retry_s: float = _f(10.0, "A generator repeats a LeaseRequest still unanswered after this long (a request "
                                    "can be lost when the learner restarts); repeats replace, never add.")


@dataclass
class LaunchConfig:
    backend: Literal["local", "ray"] = _f("local", "'local': `async-or1 train` starts every process on this machine "
        "(learner.devices / generation.devices pin them). 'ray': it connects to a running Ray cluster and runs the "
        "learner ranks (one placement group) and each generator (one actor, restarted by Ray when it dies) on the "
        "nodes Ray picks; addresses and free ports come from those nodes. Needs `pip install async-or1[ray]` and "
        "output_dir and the model on a file system every node sees.")
    ray_address: str = _f("auto", "Ray cluster to join (ray.init address): 'auto' finds the cluster started on this "
                                  "machine with `ray start`, or host:port of its head.")
    ray_learner_cpus: float = _f(1.0, "CPU cores Ray reserves for each learner rank (each rank also takes one GPU "
                                      "when the cluster has GPUs).")
    ray_generator_cpus: float = _f(1.0, "CPU cores Ray reserves for each generator (plus sglang_tp_size GPUs with "
                                        "engine sglang, or one GPU with the torch engine, when the cluster has GPUs).")
    ray_learner_resources: dict = _f({}, "Custom Ray resources each learner rank's bundle asks for, e.g. "
                                         "{learner_node: 1} to keep the learner on the nodes started with "
                                         "`ray start --resources '{\"learner_node\": 8}'`.")
    ray_generator_resources: dict = _f({}, "Custom Ray resources each generator actor asks for (see "
                                           "ray_learner_resources); a restarted generator goes wherever they are free.")
    ray_start_timeout_s: float = _f(600.0, "How long to wait for Ray to place the learner ranks and the generators "
                                           "before giving up with what is missing.")


@dataclass
class EvalConfig:
    every_steps: int = _f(0, "Evaluate the policy on the held-out rows every N steps (a multiple of "
                             "learner.broadcast_every_steps), during the run, through eval leases on the generator "
                             "pool: the generators sample the problems with the weights they hold (at least that "
                             "step's; the row records the versions the tokens came from). 0: only before and after.")
    k: int = _f(4, "Samples per problem for avg@k during training-time evaluation.")
    max_problems: int = _f(200, "Held-out problems evaluated (first N).")
    max_response_tokens: int = _f(0, "0 means the last stage's max_response_tokens.")
    at_start_and_end: bool = _f(True, "Evaluate the initial and the final model on the held-out rows (avg@k, pass@k) "
                                      "on the generator pool: the initial one before any training prompt is leased, "
                                      "the final one on the last broadcast while the learner saves.")


@dataclass
class LogConfig:
    tensorboard: bool = _f(True, "Write TensorBoard events next to metrics.jsonl.")
    print_every_steps: int = _f(1, "Terminal progress line every N steps.")
    plots: bool = _f(True, "Write PNG plots at the end of a run.")
    weight_fingerprints: bool = _f(False, "After every broadcast, hash the weights on learner rank 0 and on each "
                                          "generator (SHA-1 of the raw bytes) and record both in "
                                          "learner_summary.json, proving the copies are bit-identical. Costs one "
                                          "pass over the weights on each side; meant for tests and debugging.")


@dataclass
class SimConfig:
    """``async-or1 simulate``: cost models of the GPU run this config describes (see async_or1/sim/).
    Values marked fitted come from ``python bench/sim_calibrate.py --fit`` (README, Simulator)."""

    model: str = _f("auto", "Model shape: r1-distill-qwen-1.5b | r1-distill-qwen-7b | r1-distill-qwen-32b | "
                            "qwen2.5-math-7b; 'auto' reads the size from model.path.")
    hardware: str = _f("h800", "GPU preset with published figures: h800, h100, h200, h20, a100.")
    hardware_overrides: dict = _f({}, "Override preset fields, e.g. {hbm_GBps: 3000, ib_GBps: 25, bf16_TFLOPS: 900}.")
    gpus_per_node: int = _f(8, "GPUs per node: collectives inside a node use NVLink, across nodes InfiniBand.")
    length_median_tokens: list = _f([4877.0], "Median length of a right response, before the cut at "
                                              "max_response_tokens: one value for every stage or one per stage "
                                              "(fitted: R1-distill-7B at 16K).")
    length_sigma: float = _f(1.25, "Log-normal shape σ of response lengths (fitted, weakly: see the README).")
    wrong_length_ratio: float = _f(1.5, "A wrong response's median length over a right one's (wrong answers ramble "
                                        "longer; an assumption, not fitted).")
    decode_overhead_s: float = _f(0.00359, "Fixed seconds per decode step on top of the roofline: scheduler, sampling, "
                                         "launches (fitted to the paper's Table 9).")
    hbm_efficiency: float = _f(0.8, "Share of the HBM bandwidth a decode step's weight reads achieve (assumption).")
    kv_efficiency: float = _f(0.175, "Share of the HBM bandwidth the decode attention kernel achieves reading the KV "
                                   "cache (fitted to Table 9, i.e. vLLM 0.6.3 with the XFORMERS backend; FlashInfer "
                                   "in SGLang is likely faster).")
    flops_efficiency: float = _f(0.5, "Share of the bf16 peak that decode and prefill matmuls achieve (assumption).")
    learner_mfu: float = _f(0.484, "Model-FLOPs utilisation of a training step (fitted to the paper's Table 8).")
    max_running_requests: int = _f(0, "Sequences an engine decodes at once at most; 0: only its KV cache limits it "
                                      "(SGLang's default).")
    weight_update_recompute_kv: bool = _f(True, "After a weight update every running request re-prefills its "
                                                "context (the SGLang adapter pauses with 'retract' and flushes the "
                                                "cache); false keeps the KV ('in_place').")
    bucket_latency_s: float = _f(0.001, "Fixed cost per bucket of a weight broadcast.")
    num_problems: int = _f(20000, "Synthetic problems drawn before the offline difficulty filter.")
    prompt_median_tokens: float = _f(200.0, "Median prompt length after the chat template.")
    solved_none_all: list = _f([], "Shares of problems the base model solves 0/16 and 16/16 (before the offline "
                                   "filter), which set the zero-advantage rate. Empty: the paper's table 6.2 for "
                                   "the model.")


@dataclass
class Config:
    name: str = _f("run", "Run name; outputs go to <output_dir>/<name>/.")
    output_dir: str = _f("runs", "Parent directory of run outputs.")
    seed: int = _f(0, "Global seed.")
    mode: Literal["async", "on-policy"] = _f("async", "'on-policy' forces buffer.max_staleness = 0 and generators "
                                                     "wait for version v before sampling batch v.")
    model: ModelConfig = _f(ModelConfig(), "Policy model.")
    data: DataConfig = _f(DataConfig(), "Training and evaluation data.")
    schedule: list = _f([], "Stages walked through in order (list of StageConfig). Empty means one default stage.")
    algo: AlgoConfig = _f(AlgoConfig(), "The MAGIC loss and advantage settings.")
    rewards: RewardsConfig = _f(RewardsConfig(), "Verifiers.")
    generation: GenerationConfig = _f(GenerationConfig(), "Generator processes.")
    learner: LearnerConfig = _f(LearnerConfig(), "DeepSpeed learner.")
    buffer: BufferConfig = _f(BufferConfig(), "Replay buffer and staleness control.")
    transport: TransportConfig = _f(TransportConfig(), "ZeroMQ wire and weight-broadcast rendezvous.")
    launch: LaunchConfig = _f(LaunchConfig(), "Where the processes run: this machine, or a Ray cluster.")
    eval: EvalConfig = _f(EvalConfig(), "Held-out evaluation during training.")
    log: LogConfig = _f(LogConfig(), "Logging.")
    sim: SimConfig = _f(SimConfig(), "The GPU-scale simulator (async-or1 simulate).")

    # ---- derived views -------------------------------------------------
    @property
    def stages(self) -> list[StageConfig]:
        return list(self.schedule) if self.schedule else [StageConfig()]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def eval_response_tokens(self) -> int:
        return self.eval.max_response_tokens or self.stages[-1].max_response_tokens

    @property
    def max_staleness(self) -> int:
        """The effective bound: on-policy mode is η = 0 whatever buffer.max_staleness says."""
        return 0 if self.mode == "on-policy" else self.buffer.max_staleness

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """(stage index, stage) that training step ``step`` (0-based) belongs to."""
        return stage_at(self.stages, step)


def stage_at(stages: Any, step: int) -> tuple[int, Any]:
    """(stage index, stage) of training step ``step`` (0-based); past the end, the last stage.
    The one stage lookup: the config, the prompt source and the buffer's schedule all use it."""
    if not stages:
        raise ValueError("the schedule has no stages")
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps:
            return i, st
        start += st.steps
    return len(stages) - 1, stages[-1]


# ---------------------------------------------------------------------------
# strict loading
# ---------------------------------------------------------------------------

_LIST_ITEM_TYPES = {("Config", "schedule"): StageConfig}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            # "a,b" on the command line; "" is the empty list.
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # "devices=0" on the command line reads as the number 0
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_suggest(str(key), names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, path)
            continue
        item_cls = _LIST_ITEM_TYPES.get((cls.__name__, key))
        if item_cls is not None:
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list of stages")
            kwargs[key] = [_build(item_cls, v, f"{path}[{i}]") for i, v in enumerate(value)]
            continue
        kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
            continue
        node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, parsed value). Values are read as YAML scalars or lists."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a YAML file plus dotted overrides into a validated Config."""
    import yaml

    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for ov in overrides or []:
        key, value = parse_override(ov)
        if key.startswith("schedule.") and not tree.get("schedule"):
            tree["schedule"] = [to_dict(StageConfig())]
        _set_dotted(tree, key, value)
    try:
        cfg = _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks; every message names the field."""
    a = cfg.algo
    if not 0 <= a.clip_low < 1:
        raise ConfigError(f"algo.clip_low must be in [0, 1), got {a.clip_low}")
    if a.clip_high < 0:
        raise ConfigError(f"algo.clip_high must be >= 0, got {a.clip_high}")
    if a.temperature <= 0:
        raise ConfigError(f"algo.temperature must be > 0, got {a.temperature}")
    if not a.is_cap > 0:
        raise ConfigError(f"algo.is_cap must be > 0, got {a.is_cap}")
    for lo, hi in (("mis_low", "mis_high"), ("icepop_low", "icepop_high")):
        if not 0 < getattr(a, lo) < getattr(a, hi):
            raise ConfigError(f"algo.{lo}/{hi} must satisfy 0 < {lo} < {hi}, got {getattr(a, lo)}, {getattr(a, hi)}")
    if not a.m2po_threshold > 0:
        raise ConfigError(f"algo.m2po_threshold must be > 0, got {a.m2po_threshold}")
    if a.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef must be >= 0, got {a.kl_coef}")
    lc = cfg.learner
    for k in ("mini_batches_per_step", "passes_per_batch"):
        if getattr(lc, k) < 1:
            raise ConfigError(f"learner.{k} must be >= 1, got {getattr(lc, k)}")
    if cfg.buffer.max_staleness < 0:
        raise ConfigError(f"buffer.max_staleness must be >= 0, got {cfg.buffer.max_staleness}")
    if not 0 <= cfg.learner.zero_stage <= 3:
        raise ConfigError(f"learner.zero_stage must be 0..3, got {cfg.learner.zero_stage}")
    for i, st in enumerate(cfg.stages):
        for k in ("steps", "max_response_tokens", "prompts_per_step", "samples_per_prompt"):
            if getattr(st, k) < 1:
                raise ConfigError(f"schedule[{i}].{k} must be >= 1, got {getattr(st, k)}")
        if st.prompts_per_step % lc.mini_batches_per_step:
            raise ConfigError(f"schedule[{i}].prompts_per_step={st.prompts_per_step} is not a multiple of "
                              f"learner.mini_batches_per_step={lc.mini_batches_per_step} (mini-batches hold whole "
                              f"groups, all of one size)")
    if cfg.generation.num_generators < 1:
        raise ConfigError("generation.num_generators must be >= 1")
    if cfg.generation.devices and len(cfg.generation.devices) != cfg.generation.num_generators:
        raise ConfigError(f"generation.devices has {len(cfg.generation.devices)} entries for "
                          f"{cfg.generation.num_generators} generators")
    if cfg.learner.broadcast_every_steps < 1:
        raise ConfigError("learner.broadcast_every_steps must be >= 1")
    t = cfg.transport
    for name in ("weights_timeout_s", "lease_retry_s", "generator_timeout_s", "heartbeat_s"):
        if not getattr(t, name) > 0:
            raise ConfigError(f"transport.{name} must be > 0, got {getattr(t, name)}")
    if t.weights_attempts < 1:
        raise ConfigError(f"transport.weights_attempts must be >= 1, got {t.weights_attempts}")
    la = cfg.launch
    for name in ("ray_learner_cpus", "ray_generator_cpus"):
        if getattr(la, name) < 0:
            raise ConfigError(f"launch.{name} must be >= 0, got {getattr(la, name)}")
    if not la.ray_start_timeout_s > 0:
        raise ConfigError(f"launch.ray_start_timeout_s must be > 0, got {la.ray_start_timeout_s}")
    for name in ("ray_learner_resources", "ray_generator_resources"):
        if not isinstance(getattr(la, name), dict):
            raise ConfigError(f"launch.{name}: expected a mapping of resource name to amount, got {getattr(la, name)!r}")
        for k, v in getattr(la, name).items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"launch.{name}: {k!r}: expected a resource name and an amount > 0, got {v!r}")
    if la.backend == "ray" and cfg.transport.kind != "zmq":
        raise ConfigError("launch.backend=ray runs processes on a cluster: it needs transport.kind=zmq")
    if cfg.learner.stop_grace_s < 0:
        raise ConfigError(f"learner.stop_grace_s must be >= 0, got {cfg.learner.stop_grace_s}")
    if cfg.eval.every_steps < 0 or cfg.eval.every_steps % cfg.learner.broadcast_every_steps:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} must be 0 or a multiple of "
                          f"learner.broadcast_every_steps={cfg.learner.broadcast_every_steps} (an evaluation samples "
                          "broadcast weights)")
    if cfg.max_staleness < cfg.learner.broadcast_every_steps - 1:
        # Generators would hold weights older than the bound allows: every group would be dropped as stale.
        raise ConfigError(f"learner.broadcast_every_steps={cfg.learner.broadcast_every_steps} needs "
                          f"buffer.max_staleness >= {cfg.learner.broadcast_every_steps - 1} (effective bound is "
                          f"{cfg.max_staleness}{' in on-policy mode' if cfg.mode == 'on-policy' else ''})")


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default, documentation."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}: {f.metadata.get('doc', '')}")
            lines += describe(tp, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{name} = {default!r}  # {f.metadata.get('doc', '')}")
        if (cls.__name__, f.name) in _LIST_ITEM_TYPES:
            lines += describe(_LIST_ITEM_TYPES[(cls.__name__, f.name)], name + "[i].")
    return lines


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from ``to_dict`` output (used to hand the resolved config to child processes)."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg
