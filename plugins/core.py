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
from alignkit.generation import decode_responses, generate
from alignkit.models import response_logprobs
from alignkit.prompts import encode_prompts, prompt_format
from alignkit.registry import ComponentRegistry
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
    a row ends at any of the format's stop ids; sampling uses the KV cache and the run's
    seeded generator; the sampling log-probs are taken once here (from ``logits /
    temperature``), and the reference log-probs only when a KL term is configured
    (``rl.kl_coef > 0``). The seconds of sampling and of the reference forward are logged as
    ``time/rollout/generation`` and ``time/rollout/ref``.
    """
    start = time.perf_counter()
    rl, tok, policy = ctx.cfg.rl, ctx.tokenizer, ctx.policy
    group = int(rl.samples_per_prompt)
    fmt = policy_format(ctx)
    ids, mask, texts = encode_prompts(fmt, ctx.task, records, int(ctx.cfg.task.max_prompt_tokens))
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    was_training = policy.training
    policy.eval()
    out = generate(
        policy,
        ids,
        mask,
        max_new_tokens=int(rl.max_new_tokens),
        eos_token_id=fmt.stop_ids,
        pad_token_id=tok.pad_token_id,
        temperature=float(rl.temperature),
        top_k=int(rl.top_k),
        top_p=float(rl.top_p),
        generator=ctx.generator,
        rows=_global_rows(ctx, ids.shape[0]),
    )
    policy.train(was_training)
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
    if ctx.ref_policy is not None and float(rl.kl_coef) > 0:
        start = time.perf_counter()
        with torch.no_grad():
            logprobs = response_logprobs(
                ctx.ref_policy,
                batch.prompt_ids,
                batch.prompt_mask,
                batch.response_ids,
                batch.response_mask,
                temperature=float(rl.temperature),
            )
            assert isinstance(logprobs, torch.Tensor)
            batch.ref_logprobs = logprobs * batch.response_mask
        batch.timings["time/rollout/ref"] = time.perf_counter() - start
    return batch


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
