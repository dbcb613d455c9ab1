"""TRL's side of each workload, on the same model folder, prompts, pairs, batch and lengths.

Needs the optional ``bench`` extra (``pip install -e .[bench]``: ``trl``). Settings matched
to alignkit's side (see docs/benchmarks.md for the full list):

* fp32 everywhere: TRL defaults to bf16 on CPU, set ``bf16=False``; no gradient
  checkpointing (TRL's default recomputes activations; alignkit does not).
* GRPO: 16 prompts x 4 samples = 64 completions per step, 32 new tokens, temperature 1, no
  top-k/top-p, beta 0.05 with a reference model, one epoch (``num_iterations=1``), one optimizer
  step per generation over 4 micro-batches of 16 (``per_device_train_batch_size=16``,
  ``gradient_accumulation_steps=4``), loss ``grpo`` (per-sequence mean of token means) with
  group-std scaling, clip 0.2, AdamW(lr 1e-4, betas (0.9, 0.95), weight decay 0), gradient
  clip 1.0, linear decay, the same rule-based gold reward.
* Reward model: 16 (prompt, chosen, rejected) pairs per step, max length 96, AdamW(lr 1e-4),
  a sequence-classification head on the same trunk.

TRL 1.16 ships no PPO trainer (it left for ``trl.experimental`` and was then removed): the
PPO workload's TRL side is TRL 1.12's, in benchmarks/trl_ppo.py.

Phases of a GRPO step are read by wrapping TRL's own methods: ``_generate`` (sampling and
decoding), ``_calculate_rewards`` and the no-grad calls of ``_get_per_token_logps_and_entropies``
(reference, and old-policy when TRL computes them); the rest of
``_generate_and_score_completions`` is the advantage bookkeeping, and the update is the
remainder of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.tasks import AssistTask
from benchmarks.flop_counter import FlopCounter
from benchmarks.workloads import preference_pairs, task_prompts


def trl_version() -> str | None:
    """The installed TRL version, or None when the ``bench`` extra is missing."""
    try:
        import trl
    except ImportError:
        return None
    return str(trl.__version__)


class StepTimer:
    """Wall time of each optimizer step and of named phases inside it."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.logs: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self._start = 0.0

    def begin(self) -> None:
        self.current = {}
        self._start = time.perf_counter()

    def end(self) -> None:
        self.steps.append(time.perf_counter() - self._start)
        self.phases.append(self.current)

    def timed(self, phase: str | Any, fn: Any) -> Any:
        """``fn`` wrapped to add its wall time to ``phase`` (or ``phase(*args)`` if callable)."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = phase(*args, **kwargs) if callable(phase) else phase
                if name is not None:
                    self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

        return wrapper


def _callback(timer: StepTimer) -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            timer.begin()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            timer.end()

        def on_log(self, *_: Any, logs: dict[str, float] | None = None, **__: Any) -> None:
            if logs and "loss" in logs:  # the per-step training log, not the final summary
                timer.logs.append(dict(logs))

    return Timing()


def _checkpointing_key() -> str:
    """``activation_checkpointing`` in newer ``transformers``, ``gradient_checkpointing`` before."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    new = "activation_checkpointing"
    return new if new in names else "gradient_checkpointing"


def _common_args(args: argparse.Namespace, out: str) -> dict[str, Any]:
    """TrainingArguments both trainers share: fp32 on CPU, no checkpoints, no logging."""
    return {
        _checkpointing_key(): False,
        "output_dir": out,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "max_steps": args.warmup + args.steps,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": args.seed,
        "disable_dropout": True,
    }


def _summarise(
    args: argparse.Namespace,
    timer: StepTimer,
    flops: dict[str, float],
    samples: float,
    phases: tuple[str, ...] = ("generation", "reward", "ref", "old", "value", "update"),
) -> dict[str, Any]:
    """Mean seconds per measured step by phase; the update is the step's remainder."""
    measured = list(zip(timer.steps, timer.phases, strict=True))[args.warmup :]
    n = len(measured)
    if n == 0:
        raise RuntimeError("TRL ran no measured step")
    seconds: dict[str, float] = dict.fromkeys(phases, 0.0)
    for total, timed in measured:
        inner = sum(timed.get(k, 0.0) for k in ("generation", "reward", "ref", "old"))
        scoring = timed.get("scoring", 0.0)
        for key in ("generation", "reward", "ref", "old"):
            if key in seconds:
                seconds[key] += timed.get(key, 0.0) / n
        if "value" in seconds:
            seconds["value"] += max(scoring - inner, 0.0) / n
        seconds["update"] += (total - max(scoring, inner)) / n
    seconds["total"] = sum(timer.steps[args.warmup :]) / n
    return {
        "step_seconds": timer.steps[args.warmup :],
        "seconds_per_step": seconds,
        "flops_per_step": {k: v / n for k, v in flops.items()},
        "samples_per_step": samples,
    }


def run_trl_grpo(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on the reference workload."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    task = AssistTask()
    records = task_prompts(task, 4 * args.prompts * (args.warmup + args.steps))
    by_index = dict(enumerate(records))
    dataset = Dataset.from_dict(
        {"prompt": [task.format_prompt(r) for r in records], "record": list(by_index)}
    )

    def gold(prompts: list[str], completions: list[str], record: list[int], **_: Any) -> list:
        return [task.gold_score(by_index[i], c) for i, c in zip(record, completions, strict=True)]

    rows = args.prompts * args.samples
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = GRPOConfig(
            **_common_args(args, tmp),
            per_device_train_batch_size=args.micro,
            gradient_accumulation_steps=rows // args.micro,
            num_generations=args.samples,
            max_completion_length=args.new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=0.05,
            num_iterations=1,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            log_completions=False,
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=gold,
            args=config,
            train_dataset=dataset,
            callbacks=[_callback(timer)],
        )
        policy = trainer.accelerator.unwrap_model(trainer.model)
        counter = FlopCounter().attach(policy, "policy").attach(trainer.ref_model, "ref")
        flops = dict.fromkeys(("generation", "ref", "old", "update"), 0.0)

        def logp_phase(model: Any, *_: Any, **__: Any) -> str | None:
            if torch.is_grad_enabled():
                return None
            return "ref" if model is trainer.ref_model else "old"

        trainer._generate = timer.timed("generation", trainer._generate)
        trainer._calculate_rewards = timer.timed("reward", trainer._calculate_rewards)
        trainer._get_per_token_logps_and_entropies = timer.timed(
            logp_phase, trainer._get_per_token_logps_and_entropies
        )
        trainer._generate_and_score_completions = timer.timed(
            "scoring", trainer._generate_and_score_completions
        )

        # Count measured steps only: reset the counter as the first measured step begins.
        original_begin = timer.begin

        def begin() -> None:
            if len(timer.steps) == args.warmup:
                counter.reset()
            original_begin()

        timer.begin = begin  # type: ignore[method-assign]
        trainer.train()
        flops["generation"] = counter.total("policy", grad=False)
        flops["ref"] = counter.total("ref")
        flops["update"] = counter.total("policy", grad=True)
        flops["total"] = sum(flops.values())
        result = _summarise(args, timer, flops, float(rows))
        lengths = [log.get("completions/mean_length", 0.0) for log in timer.logs][args.warmup :]
        result["tokens_per_step"] = rows * sum(lengths) / max(len(lengths), 1)
        return result


def run_trl_reward_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """TRL's RewardTrainer on ``--pairs`` pairs per step of the same preference pairs."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    pairs = preference_pairs(AssistTask(), args.seed)
    dataset = Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in pairs],
            "chosen": [" " + c for _, c, _ in pairs],
            "rejected": [" " + r for _, _, r in pairs],
        }
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    timer = StepTimer()
    counter = FlopCounter().attach(model, "rm")
    # Reward-model steps are cheap: --rm-steps of them are measured, as on alignkit's side.
    args = argparse.Namespace(**{**vars(args), "steps": args.rm_steps})
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = RewardConfig(
            **_common_args(args, tmp), per_device_train_batch_size=args.pairs, max_length=96
        )
        trainer = RewardTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[_callback(timer)],
        )
        original_begin = timer.begin

        def begin() -> None:
            if len(timer.steps) == args.warmup:
                counter.reset()
            original_begin()

        timer.begin = begin  # type: ignore[method-assign]
        masks: list[torch.Tensor] = []  # every batch's attention mask (chosen, then rejected)
        collate = trainer.data_collator

        def collate_and_keep(*a: Any, **kw: Any) -> Any:
            batch = collate(*a, **kw)
            masks.append(batch["attention_mask"])
            return batch

        trainer.data_collator = collate_and_keep
        trainer.train()
    flops = {"update": counter.total(), "total": counter.total()}
    result = _summarise(args, timer, flops, float(args.pairs), phases=("update",))
    result["tokens_per_step"] = 0.0
    measured = masks[args.warmup : args.warmup + args.steps]
    result["trained_tokens_per_step"] = sum(float(m.sum()) for m in measured) / max(
        len(measured), 1
    )
    return result


def run_trl_generation(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """``transformers`` ``generate`` (what GRPOTrainer samples with) on the same rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = AssistTask()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    counter = FlopCounter().attach(model, "policy")
    texts = [task.format_prompt(r) for r in task_prompts(task, args.prompts)]
    enc = tok(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"].repeat_interleave(args.samples, 0)
    mask = enc["attention_mask"].repeat_interleave(args.samples, 0)
    seconds = tokens = 0.0
    step_seconds = []
    torch.manual_seed(args.seed)
    for step in range(args.warmup + args.steps):
        counter.reset()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        if step >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
            seconds += step_seconds[-1]
            new = out[:, ids.shape[1] :]
            # Real tokens: up to and including each row's first EOS.
            is_eos = (new == tok.eos_token_id).int()
            before = (is_eos.cumsum(1) - is_eos) == 0
            tokens += float(before.sum())
    n = args.steps
    return {
        "seconds_per_step": {"generation": seconds / n, "total": seconds / n},
        "flops_per_step": {"generation": counter.total(), "total": counter.total()},
        "samples_per_step": float(ids.shape[0]),
        "tokens_per_step": tokens / n,
        "step_seconds": step_seconds,
    }


TRL_RUNNERS = {
    "generation": run_trl_generation,
    "grpo": run_trl_grpo,
    "reward_model": run_trl_reward_model,
}
"""Workloads with a TRL 1.16 side (PPO's is TRL 1.12's: benchmarks/trl_ppo.py)."""
