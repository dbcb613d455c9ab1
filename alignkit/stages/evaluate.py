"""``stage=eval``: compare two policies with the gold oracle on held-out prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.errors import ConfigError
from alignkit.evaluation import gold_scores, sample_policy, sample_table, sequence_kl, win_rate
from alignkit.stages.common import load_model


def compare_policies(
    ctx: RunContext, policy: Any, baseline: Any, tokenizer: Any
) -> dict[str, float]:
    """Gold score of each, win-rate of ``policy`` over ``baseline``, KL(policy || baseline).

    Each held-out prompt is sampled ``eval.samples_per_prompt`` times per policy (the i-th
    sample of one against the i-th of the other), which narrows the win-rate's sampling noise
    without more prompts.
    """
    ecfg = ctx.cfg.eval
    prompts = ctx.task.eval_prompts()[: int(ecfg.num_prompts)]
    k = int(ecfg.samples_per_prompt)
    if k < 1:
        raise ConfigError(f"eval.samples_per_prompt must be >= 1, got {k}")
    records = [r for _ in range(k) for r in prompts]

    def sample(model: Any, seed_offset: int) -> Any:
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + seed_offset)
        return sample_policy(
            model,
            tokenizer,
            ctx.task,
            records,
            max_new_tokens=int(ecfg.max_new_tokens),
            temperature=float(ecfg.temperature),
            greedy=bool(ecfg.greedy),
            batch_size=int(ecfg.batch_size),
            max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
            generator=gen,
        )

    pol, base = sample(policy, 11), sample(baseline, 12)
    s_pol = gold_scores(ctx.task, records, pol.responses)
    s_base = gold_scores(ctx.task, records, base.responses)
    kl = sequence_kl(policy, baseline, pol, temperature=float(ecfg.temperature))
    header, rows = sample_table(
        records,
        {"baseline": base.responses, "policy": pol.responses},
        {"baseline": s_base, "policy": s_pol},
        int(ecfg.samples_to_show),
    )
    ctx.tracker.log_table("eval_samples", header, rows)
    return {
        "gold_score_sft": sum(s_base) / len(s_base),
        "gold_score_policy": sum(s_pol) / len(s_pol),
        "gold_win_rate": win_rate(s_pol, s_base),
        "kl_to_sft": kl,
        "eval_prompts": float(len(prompts)),
        "eval_samples": float(len(records)),
    }


def run_eval(ctx: RunContext) -> dict[str, float]:
    """``eval.policy`` vs ``eval.baseline`` (both HF folders)."""
    ecfg = ctx.cfg.eval
    if not ecfg.policy or not ecfg.baseline:
        raise ConfigError("stage=eval needs eval.policy and eval.baseline (two policy folders)")
    policy, tokenizer = load_model(ctx, Path(ecfg.policy))
    baseline, _ = load_model(ctx, Path(ecfg.baseline))
    return compare_policies(ctx, policy, baseline, tokenizer)
