"""Config schemas: dataclasses stored in Hydra's ConfigStore before composition.

Because every node is a structured config, a misspelt key (``sft.lrr=1``, or a stray key in an
experiment file) fails at composition, before anything runs, with a message naming the key.
Plugins add their own nodes (``algorithm/<name>``, ``reward/<name>``) through the
``register_configs`` hook, which makes them selectable as ``algorithm=<name>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig

from alignkit.preference_config import FeedbackConfig, RewardModelConfig


@dataclass
class TinyModelConfig:
    """The tiny model built from scratch when ``model.path`` is null.

    ``arch`` picks the architecture (``gpt2``, the default, or any of
    :data:`alignkit.models.tiny.ARCHITECTURES`: ``llama``, ``qwen2``, ``mistral``, ``gemma``,
    ``gpt_neox``); the other fields give its shape in any architecture.
    """

    arch: str = "gpt2"
    vocab_size: int = 1024
    n_layer: int = 4
    """Layers."""
    n_head: int = 4
    """Attention (query) heads."""
    n_embd: int = 256
    """Width."""
    n_positions: int = 128
    """Longest sequence (the position table of GPT-2, the context of the others)."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention) where the architecture has them; null:
    ``n_head``."""
    intermediate: int | None = None
    """MLP width; null: ``4 * n_embd`` (GPT-2, GPT-NeoX) or the multiple of 8 nearest
    ``8/3 * n_embd`` (gated MLPs: the same parameter count)."""


@dataclass
class LoraConfig:
    """LoRA adapters on the policy in RL (``model.lora.r > 0``; needs ``alignkit[lora]``).

    The reference policy is then the same model with its adapters disabled: no second copy.
    """

    r: int = 0
    """Adapter rank; 0 trains all weights."""
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    """Modules to adapt: ``all-linear`` (every linear layer but the output head, on any
    architecture; on GPT-2 that is ``c_attn``, ``c_proj`` and ``c_fc``), a list of module
    names, a regex, or null for ``peft``'s defaults of the architecture."""


@dataclass
class ModelConfig:
    """The base policy: a transformers causal LM, from a folder or a hub name."""

    path: str | None = None
    """HF folder or hub name; null builds the task's tiny model into ``<run_dir>/base_model``."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TaskConfig:
    """The task: the built-in synthetic ``assist`` task, or ``data`` (your own data; see
    docs/data.md), or another registered ``task`` component."""

    name: str = "assist"
    seed: int = 0
    template: str = "auto"
    """How prompts are rendered for each model (policy, reward model, judge), with its own
    tokenizer: ``auto`` (its chat template when it has one, else plain), ``chat``, ``plain``
    (``User: ...\nAssistant:``) or ``raw`` (plain-text prompts verbatim, as TRL reads
    non-conversational data)."""
    max_operand: int = 5
    """assist: arithmetic operands 0..max_operand."""
    demonstrations: int = 4000
    """assist: synthetic SFT demonstrations to draw (deliberately of mixed quality)."""
    sft_data: str | None = None
    """SFT demonstrations in a standard format (prompt/completion, ``messages``) or as
    ``{"prompt": ..., "response": ...}`` lines whose prompt is the verbatim model input: a
    JSONL/JSON/Parquet/CSV file, a ``datasets`` folder or a cached dataset name."""
    prompt_data: str | None = None
    """RL prompts. assist: JSONL of its records (``id, kind, text, answer``); data: any
    standard format (``{"prompt": ...}``, conversational ``prompt`` or ``messages``)."""
    preference_data: str | None = None
    """data: preference pairs (``chosen``/``rejected``, explicit or implicit prompt) that
    train the reward model directly (no feedback stage)."""
    eval_data: str | None = None
    """data: held-out evaluation prompts (else ``eval_split``, else ``eval_fraction``)."""
    split: str = "train"
    """data: the split read from ``datasets`` folders and cached datasets."""
    eval_split: str | None = None
    """data: a split of the prompt source held out for evaluation (e.g. ``test``)."""
    eval_fraction: float = 0.1
    """data: seeded fraction of the prompts held out when no eval source is given."""
    columns: dict[str, str] = field(default_factory=dict)
    """data: canonical field -> your column, e.g. ``{prompt: question, chosen: good}``."""
    max_prompts: int | None = None
    """data: keep only the first N training prompts (null: all)."""
    max_prompt_tokens: int = 32
    """Prompt tokens kept (from the left) when sampling."""


@dataclass
class SFTConfig:
    max_length: int | None = None
    """Tokens per demonstration (prompt + response); null: the model's context size. A longer
    one loses the end of its response, never its prompt."""
    steps: int = 600
    """Optimiser steps (``batch_size`` demonstrations each). 600 because RL, the reward model
    and their win-rate all build on what SFT learned: on the built-in task, from 300 to 600
    steps the SFT policy's held-out gold score went 0.25 -> 0.33, the reward model trained on
    its samples agreed with gold on 0.81 -> 0.85 of held-out pairs, and PPO's gold win-rate
    over its own SFT policy went 0.63-0.65 -> 0.70 (README); 1000 steps gave 0.71."""
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    log_every: int = 10


@dataclass
class OptimConfig:
    """AdamW for the RL stage."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class RLConfig:
    """The online RL loop shared by every algorithm."""

    steps: int = 75
    """RL steps (each: rollout, reward, advantage, update). 75 because GRPO, whose advantages
    are standardised per group, still gained after step 50 on the built-in task: gold win-rate
    over the 600-step SFT policy 0.647-0.652 at 50 steps (four runs) against 0.651-0.671 at 75
    (two); PPO went 0.70 -> 0.71 and RLOO 0.69 -> 0.70."""
    prompts_per_step: int = 32
    """Prompts per RL step. 32: on the built-in task the gold win-rate of PPO's policy rose
    from about 0.59-0.61 at 16 to 0.62-0.64 at the same 50 steps (README)."""
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    """Sample rollouts from the k most likely tokens (0: all); needs
    ``allow_truncated_sampling``."""
    top_p: float = 1.0
    """Sample rollouts from the smallest set of tokens with this much probability (1: all);
    needs ``allow_truncated_sampling``."""
    allow_truncated_sampling: bool = False
    """Accept ``top_k > 0`` or ``top_p < 1`` in RL. The recorded old log-probs, like the
    update's, are the full temperature-scaled distribution's, as TRL and verl compute them,
    not the truncated distribution the tokens were sampled from: the update is then
    off-policy by the truncation, which nothing corrects. Refused unless this is true."""
    kl_coef: float = 0.2
    """Coefficient of the KL penalty to the reference policy; 0 skips the reference forward.

    0.2 per token because the learned reward is normalised to unit std and responses are a
    few tokens long: on the built-in task's default pipeline PPO at 0.05 over-optimised the
    reward model (gold win-rate 0.52, KL 2.1 nats), at 0.2 it did not (0.59, KL 0.68). With
    the K = 32 reward model (README) 0.2 stayed best: 0.64-0.65 against 0.63 at 0.1 and 0.62
    at 0.3."""
    kl_estimator: str | None = None
    """Per-token estimate of KL(pi || ref) (:func:`alignkit.rl.ops.kl_penalty`): k1, k2 or k3,
    computed once per rollout (``Rollout.kl``) and used wherever the KL enters. null: k1 where
    the algorithm keeps the KL in the reward (PPO, RLOO, REINFORCE++), k3 where it keeps it in
    the loss (GRPO, ``algorithm.kl_in_loss=true``). k1 is right in the reward; in the loss its
    expected gradient is zero, so it is refused there: use k2 (gradient of KL(pi || ref)) or
    k3."""
    checkpoint_every: int = 20
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    resume: bool = False
    """Continue from the latest complete checkpoint in ``<run_dir>/rl/checkpoints`` (model,
    optimizer, scheduler, RNG, data position, plugin state such as the KL controller) and the
    same W&B run; with no checkpoint yet the run starts from step 0, so a job script can always
    pass ``rl.resume=true`` (resume if possible, else start)."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Config keys (or key prefixes) a resume may change from the checkpoint's run; ``*``
    allows any. A resume that changes another run-defining key is refused, naming it."""
    max_consecutive_skips: int = 3
    """Updates with non-finite gradients are skipped; this many in a row stop the run."""
    log_every: int = 1
    samples_every: int = 20
    """Log a table of sample generations every N steps (0: never)."""
    samples_to_log: int = 8
    select_every: int = 0
    """Keep the policy every N steps and choose the final one by the feedback annotator's
    comparisons with the start policy (``alignkit.stages.select``; 0: the last policy). The
    kept policies live in memory: not under a sharded backend, and a resumed run chooses
    among the start and the policies kept since it resumed."""
    select_prompts: int = 64
    """Prompts (training split, one sample each) per kept policy's comparison."""
    probe_every: int = 5
    """Offline algorithms (DPO: nothing sampled): every N steps and at the last, sample one
    response per prompt of the step so the logged ``gold/score``, response statistics and
    ``kl/ref`` describe the policy (0: never)."""
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class EvalJudgeConfig:
    """``eval.judge``: a pairwise LLM judge of policy vs baseline responses (docs/evaluation.md).

    The model fields mean what they mean in ``reward.critique.judge``
    (:class:`alignkit.judges.config.JudgeConfig`), so a ``conf/judge/*.yaml`` node's values
    can be copied here.
    """

    backend: str = "none"
    """none (no judged win-rate) | local (a causal LM from ``path``) | http (``url``)."""
    template: str = "general"
    """``conf/prompts/<name>.yaml`` or a path to a template file; its ``pairwise`` text and
    ``pairwise_verdicts`` are used. general: instructions for an instruction-following model;
    assist: the texts the built-in task's tiny judge (``stage=judge``) was trained on."""
    both_orders: bool = True
    """Judge (policy, baseline) and (baseline, policy) and average, ``(P_AB + 1 - P_BA) / 2``,
    which cancels the judge's preference for a position."""
    on_error: str = "raise"
    """raise (a failed verdict stops the evaluation) | fallback (it counts as
    ``fallback_value`` and is counted in ``judge_failures``)."""
    fallback_value: float | None = None
    """on_error=fallback: the probability a failed verdict gives response A (e.g. 0.5)."""
    max_critique_tokens: int = 64
    """Generation budget for the critique and the verdict."""
    # local
    path: str | None = None
    """local: HF folder of the judge model (``stage=judge`` writes ``<run_dir>/judge``)."""
    dtype: str = "float32"
    trust_remote_code: bool = False
    batch_size: int = 64
    """local: contexts per generation batch."""
    max_length: int | None = None
    """local: context tokens kept; null: the model's limit minus the generation budget."""
    # http
    url: str | None = None
    """http: base URL with the version prefix, e.g. ``http://127.0.0.1:8000/v1``."""
    endpoint: str = "completions"
    """http: completions (``/v1/completions``) | chat (``/v1/chat/completions``)."""
    model: str = "judge"
    """http: the ``model`` field of the requests."""
    api_key_env: str | None = None
    """http: NAME of the environment variable holding the API key (never the key)."""
    max_concurrency: int = 8
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    deadline_s: float | None = 60.0
    """Total seconds one request may take, retries included (null: no deadline)."""
    """First retry delay; doubles with each retry."""
    top_logprobs: int = 5
    """Alternatives per token requested for the verdict (0: parse the verdict from text)."""


@dataclass
class EvalConfig:
    """Held-out comparison of a policy with a baseline (``stage=eval``, end of the pipeline).

    Win-rates come from up to three judges: the task's gold oracle (built-in task only), a
    reward model and a pairwise LLM judge; ``win_rate`` is the gold one when the task has an
    oracle, else the judge's, else the reward model's (docs/evaluation.md).
    """

    num_prompts: int = 200
    samples_per_prompt: int = 4
    """Responses per held-out prompt and policy; the win-rate pairs the i-th of each."""
    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0
    batch_size: int = 64
    """Prompts per generation batch, and texts per reward-model forward."""
    samples_to_show: int = 6
    policy: str | None = None
    """``stage=eval``: the policy folder to evaluate."""
    baseline: str | None = None
    """``stage=eval``: the policy folder to compare against (e.g. the SFT policy)."""
    reward_model: str | None = None
    """A trained reward-model folder (or a folder of ``member_<i>`` folders, averaged) that
    scores both policies; null: the run's own learned reward, i.e. the first active
    ``reward.<name>`` with a ``path``/``paths``, which is optimistic for a policy trained
    against it: pass a held-out reward model here for an honest number."""
    judge: EvalJudgeConfig = field(default_factory=EvalJudgeConfig)


@dataclass
class BackendConfig:
    """Hardware: ``backend=cpu`` (default), ``single_gpu`` or ``fsdp`` (see docs/backends.md)."""

    name: str = "cpu"
    device: str = "cpu"
    """cpu, cuda, cuda:<i>, or auto (fsdp: cuda:<LOCAL_RANK> when CUDA is available, else cpu)."""
    threads: int | None = None
    """torch intra-op threads; null keeps torch's default."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, more compute)."""
    timeout_s: float = 1800.0
    """fsdp: timeout of collectives, in seconds."""


@dataclass
class RolloutConfig:
    """What samples RL rollouts: ``rollout=native`` (default) or ``rollout=vllm``; and the
    training-inference mismatch correction (docs/rollout.md)."""

    name: str = "native"
    """native: alignkit's sampler on the policy; vllm: a vLLM engine synced with it."""
    mode: str = "colocate"
    """vllm: colocate (the engine in this process, on this device) or server (a separate
    process: started by alignkit, or at ``url``)."""
    url: str | None = None
    """vllm server: ``host:port`` of a running ``python -m alignkit.rollout.vllm_server``;
    null starts one as a child process."""
    python: str | None = None
    """vllm server started by alignkit: the interpreter of the vLLM environment (null: this
    one)."""
    authkey_env: str = "ALIGNKIT_VLLM_AUTHKEY"
    """vllm server: the environment variable holding the connection's shared secret."""
    dtype: str = "auto"
    """vllm: weights' dtype in the engine (auto: float32 on the CPU, vLLM's own choice on a
    GPU, which turns a float32 config into bfloat16; float32 there matches the trainer)."""
    gpu_memory_utilization: float = 0.3
    """vllm on a GPU: the share of the GPU's memory the engine may take (weights and KV
    cache), leaving the rest to training when colocated."""
    kv_cache_memory_mb: int | None = None
    """vllm: KV-cache size in MiB (null: 64 on the CPU, from gpu_memory_utilization on a
    GPU)."""
    tensor_parallel_size: int = 1
    """vllm server on GPUs: shard the engine over this many GPUs."""
    enforce_eager: bool | None = None
    """vllm: no CUDA graphs / compilation (null: true on the CPU, false on a GPU)."""
    correction: str = "auto"
    """Mismatch correction (alignkit.rollout.mismatch): auto (tis when the engine is not the
    trainer), none, or parts joined by '+': tis, mis, seq_mask."""
    tis_cap: float = 2.0
    """tis: truncate each token's importance weight pi_old / mu at this value."""
    mis_low: float = 0.5
    """mis: tokens whose weight is below this are masked out of the loss."""
    mis_high: float = 2.0
    """mis: tokens whose weight is above this are masked out of the loss."""
    seq_low: float = 0.5
    """seq_mask: responses whose geometric-mean weight is below this are masked out."""
    seq_high: float = 2.0
    """seq_mask: responses whose geometric-mean weight is above this are masked out."""


@dataclass
class WandbConfig:
    mode: str = "auto"
    """auto (online when an API key is configured, offline otherwise), online, offline, disabled."""
    project: str = "alignkit"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class AlgorithmConfig:
    """Base of every algorithm's node: ``name`` is the plugin that implements it."""

    name: str = MISSING


@dataclass
class RewardConfig:
    """Base of every reward component's node (stored under ``reward.<plugin name>``)."""

    weight: float = 1.0


@dataclass
class PipelineConfig:
    """``stage=pipeline``: how its stages repeat."""

    sft_policy: str | None = None
    """An SFT policy folder to start from (your own, or an earlier run's ``sft``): the SFT
    stage is skipped and every later stage uses this policy where it would use the one SFT
    trains. null: train it."""
    select_every: int = 15
    """The pipeline's RL keeps its policy every N steps and ends on the one the feedback
    annotator prefers over the start (``rl.select_every``, which wins when set; about 200
    comparisons more for 75 steps): a safeguard against a reward model that noisy labels
    taught wrong. Applied when the annotator compares responses (the simulated human, a
    judge; not people in the labelling app); 0: off."""
    rounds: int = 1
    """Rounds of feedback -> reward model -> RL (continuous improvement,
    :mod:`alignkit.stages.rounds`): each later round labels the last round's policy's samples,
    extends the last reward model on every label so far, and trains RL on from the last
    policy (KL still to SFT). ``feedback.max_labels`` and ``rl.steps`` are split evenly."""


@dataclass
class AlignkitConfig:
    stage: str = "pipeline"
    """sft | rl | eval | pipeline (sft -> rl -> eval), or a stage a plugin registers."""
    seed: int = 0
    run_dir: str | None = None
    """Where outputs go; null uses Hydra's output directory."""
    objective: str = "gold_score_policy"
    """The ``summary.json`` key the run returns to Hydra's sweepers (e.g. Optuna maximises it);
    when a stage has no such key: gold_score_policy, rl_final/gold/score, gold_score_sft,
    win_rate (a task without a gold oracle)."""
    plugins: list[str] = field(default_factory=list)
    """Extra plugins to activate besides the algorithm and the rewards."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: Any = MISSING
    reward: dict[str, Any] = field(default_factory=dict)
    backend: BackendConfig = field(default_factory=BackendConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form keys that no schema declares (``extra.note=...``), e.g. for a plugin that
    reads its own settings; anywhere else an undeclared key is refused."""


FREE_FORM = "extra"
"""The one top-level node whose keys no schema declares."""


def undeclared_keys(cfg: DictConfig) -> list[str]:
    """Dotted paths of keys that no schema (core or plugin dataclass) declares.

    Hydra's ``+key=value`` adds a key even to a structured config, so ``+totally_bogus_key=1``
    or ``+rl.lrr=1`` would pass composition and be ignored by everything. A key is declared
    when its node's dataclass has that field; nodes that are plain dicts in their schema
    (``reward``, ``task.columns``, ``extra``) take any key.
    """
    return list(_undeclared(cfg, ""))


def _undeclared(node: Any, path: str) -> Iterator[str]:
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _undeclared(node._get_node(i), f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    schema = node._metadata.object_type
    fields = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in node:
        where = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            yield where
        elif where != FREE_FORM:
            yield from _undeclared(node._get_node(key), where)


def store_algorithm(cs: ConfigStore, name: str, node: Any) -> None:
    """Register an algorithm schema, selectable as ``algorithm=<name>``."""
    cs.store(group="algorithm", name=name, node=node)


def store_reward(cs: ConfigStore, name: str, node: Any) -> None:
    """Register a reward schema under ``reward.<name>``, selectable as ``reward=[a,b]``."""
    cs.store(group="reward", name=name, node=node, package=f"reward.{name}")


def register_base_schemas(cs: ConfigStore) -> None:
    """The top-level schema and the group schemas that the YAML files in ``conf/`` extend."""
    cs.store(name="alignkit_schema", node=AlignkitConfig)
