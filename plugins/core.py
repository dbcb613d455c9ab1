"""The core plugin: the built-in task and stages, and the default sampling rollout.

Always active. Its ``rollout`` is registered ``trylast`` so an algorithm plugin may replace
it (an offline method reads stored pairs instead of sampling).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from alignkit import Rollout, RunContext, hookimpl
from alignkit.data.chat import PromptFormat
from alignkit.generation import decode_responses
from alignkit.models import response_logprobs
from alignkit.prompts import encode_prompts, prompt_format
from alignkit.registry import ComponentRegistry
from alignkit.rollout import (
    ENGINE_LOGPROBS,
    IS_WEIGHTS,
    MismatchCorrection,
    NativeEngine,
    correction_weights,
    rollout_engine,
)
from alignkit.tasks import AssistTask
from alignkit.tasks.data import DataTask


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    from alignkit.stages.evaluate import run_eval
    from alignkit.stages.pipeline import run_pipeline
    from alignkit.stages.rl import run_rl
    from alignkit.stages.sft import run_sft

    registry.add("task", "assist", AssistTask)
    registry.add("task", "data", DataTask)
    registry.add("rollout_engine", "native", NativeEngine)
    registry.add("stage", "sft", run_sft)
    registry.add("stage", "rl", lambda ctx: run_rl(ctx)[0])
    registry.add("stage", "eval", run_eval)
    registry.add("stage", "pipeline", run_pipeline)


def policy_format(ctx: RunContext) -> PromptFormat:
    """The policy's prompt format (chat template or plain, ``task.template``), built once per
    run; its stop ids are the tokenizer's EOS, the generation config's and the template's."""
    key = "core/prompt_format"
    fmt = ctx.state.get(key)
    if fmt is None or fmt.tokenizer is not ctx.tokenizer:
        fmt = ctx.state[key] = prompt_format(ctx.cfg, ctx.tokenizer, ctx.policy)
    return fmt


def _global_rows(ctx: RunContext, rows: int) -> tuple[int, int]:
    """``(offset, total)`` of this rank's ``rows`` in the step's global batch.

    The engine gives every rank an equal contiguous share of the step's prompts, so rank r's
    rows start at ``r * rows`` of ``world_size * rows``: sampling then draws what one process
    would draw for them (:func:`alignkit.generation.sample_from`).
    """
    return ctx.backend.rank * rows, ctx.backend.world_size * rows


@hookimpl(trylast=True)
def rollout(ctx: RunContext, records: list[Any]) -> Rollout:
    """Sample ``rl.samples_per_prompt`` responses per prompt with the current policy.

    Prompts are rendered in the policy's format (:mod:`alignkit.prompts`) and left-padded;
    a row ends at any of the format's stop ids. The configured engine samples
    (``rollout=native``: alignkit's sampler with the KV cache and the run's seeded generator;
    ``rollout=vllm``: vLLM, :mod:`alignkit.rollout`); the sampling log-probs are taken there
    (from ``logits / temperature``). When they are not the trainer's, the trainer's are
    computed here too and the mismatch weights set (:func:`correct_mismatch`). The reference
    log-probs are computed only when a KL term is configured (``rl.kl_coef > 0``). Seconds
    are logged as ``time/rollout/generation``, ``time/rollout/trainer_logprobs`` and
    ``time/rollout/ref``.
    """
    start = time.perf_counter()
    rl, tok = ctx.cfg.rl, ctx.tokenizer
    group = int(rl.samples_per_prompt)
    fmt = policy_format(ctx)
    ids, mask, texts = encode_prompts(fmt, ctx.task, records, int(ctx.cfg.task.max_prompt_tokens))
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    engine = rollout_engine(ctx)
    out = engine.generate(ctx, ids, mask, fmt.stop_ids, _global_rows(ctx, ids.shape[0]))
    generated = time.perf_counter()
    batch = Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=out.response_ids,
        response_mask=out.response_mask.float(),
        group_ids=torch.arange(len(records), device=ctx.device).repeat_interleave(group),
        prompts=[t for t in texts for _ in range(group)],
        responses=decode_responses(tok, out.response_ids, out.response_mask, fmt.stop_ids),
        records=[r for r in records for _ in range(group)],
        finished=out.finished,
        logprobs=out.logprobs,
    )
    batch.timings["time/rollout/generation"] = generated - start
    if not engine.trainer_logprobs:
        start = time.perf_counter()
        correct_mismatch(ctx, batch)
        batch.timings["time/rollout/trainer_logprobs"] = time.perf_counter() - start
    if ctx.ref_policy is not None and float(rl.kl_coef) > 0:
        start = time.perf_counter()
        batch.ref_logprobs = scored_logprobs(ctx, ctx.ref_policy, batch)
        batch.timings["time/rollout/ref"] = time.perf_counter() - start
    return batch


@torch.no_grad()
def scored_logprobs(ctx: RunContext, model: torch.nn.Module, batch: Rollout) -> torch.Tensor:
    """(B, R) log-probs of the batch's responses under ``model`` at the sampling temperature,
    0 at padding (no grad)."""
    logprobs = response_logprobs(
        model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.response_ids,
        batch.response_mask,
        temperature=float(ctx.cfg.rl.temperature),
    )
    assert isinstance(logprobs, torch.Tensor)
    return logprobs * batch.response_mask


def correct_mismatch(ctx: RunContext, batch: Rollout) -> None:
    """The trainer's own log-probs of an engine's samples, and the correction weights.

    ``batch.logprobs`` becomes the trainer's ``log pi_old`` at the weights the engine sampled
    with (a no-grad forward of this rank's rows), so the update's ratio starts at 1; the
    engine's ``log mu`` moves to ``extras[ENGINE_LOGPROBS]``, and ``extras[IS_WEIGHTS]``
    holds the ``rollout.correction`` weights (:mod:`alignkit.rollout.mismatch`) that multiply
    each token's policy-gradient loss.
    """
    assert ctx.policy is not None and batch.logprobs is not None
    was_training = ctx.policy.training
    ctx.policy.eval()
    try:
        trainer = scored_logprobs(ctx, ctx.policy, batch)
    finally:
        ctx.policy.train(was_training)
    mask = batch.response_mask
    batch.extras[ENGINE_LOGPROBS] = batch.logprobs * mask
    batch.logprobs = trainer
    correction = MismatchCorrection.from_config(ctx.cfg.get("rollout") or {}, False)
    if correction is not None:
        batch.extras[IS_WEIGHTS] = correction_weights(
            batch.logprobs, batch.extras[ENGINE_LOGPROBS], mask, correction
        )


@hookimpl
def step_end(ctx: RunContext, step: int, batch: Rollout, metrics: dict[str, float]) -> None:
    """Log the gold oracle's score of every step's samples next to the training reward.

    The gold score is never part of the reward unless ``reward=gold`` is active; logged beside
    a learned reward (``reward/<name>``) it makes over-optimisation visible: the learned
    reward keeps rising while ``gold/score`` stalls or falls.
    """
    gold = getattr(ctx.task, "gold_score", None)
    if gold is None or not batch.records:
        return
    scores = [gold(r, s) for r, s in zip(batch.records, batch.responses, strict=True)]
    metrics["gold/score"] = sum(scores) / len(scores)
