"""Building a :class:`~alignkit.batch.Rollout`: sampling with the run's engine, or encoding
given responses, with the log-probs and the per-token KL the phases need.

``RunContext.sample`` and ``RunContext.encode`` are the public entry points; the core's
``rollout`` hook is ``ctx.sample(records)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.data.chat import PromptFormat
from alignkit.data.prompts import conversations, encode_prompts, prompt_format
from alignkit.models import response_logprobs
from alignkit.models.generation import decode_responses
from alignkit.rl.ops import kl_penalty
from alignkit.rollout.engines import (
    ENGINE_LOGPROBS,
    IS_WEIGHTS,
    SamplingOptions,
    rollout_engine,
)
from alignkit.rollout.mismatch import MismatchCorrection, correction_weights

__all__ = [
    "SamplingOptions",
    "correct_mismatch",
    "encode_responses",
    "policy_format",
    "reference_forward",
    "sample_rollout",
    "scored_logprobs",
]

FORMAT_KEY = "core/prompt_format"


def policy_format(ctx: RunContext) -> PromptFormat:
    """The policy's prompt format (chat template or plain, ``task.template``), built once per
    run; its stop ids are the tokenizer's EOS, the generation config's and the template's."""
    fmt = ctx.state.get(FORMAT_KEY)
    if fmt is None or fmt.tokenizer is not ctx.tokenizer:
        fmt = ctx.state[FORMAT_KEY] = prompt_format(ctx.cfg, ctx.tokenizer, ctx.policy)
    return fmt


def global_rows(ctx: RunContext, rows: int) -> tuple[int, int]:
    """``(offset, total)`` of this rank's ``rows`` in the step's global batch.

    The engine gives every rank an equal contiguous share of the step's prompts, so rank r's
    rows start at ``r * rows`` of ``world_size * rows``: sampling then draws what one process
    would draw for them (:func:`alignkit.models.generation.sample_from`).
    """
    return ctx.backend.rank * rows, ctx.backend.world_size * rows


def sample_rollout(
    ctx: RunContext,
    records: Sequence[Any],
    options: SamplingOptions,
    group: int,
    reference: bool = True,
) -> Rollout:
    """``group`` responses per record from the configured engine, as one batch.

    Prompts are rendered in the policy's format (:mod:`alignkit.data.prompts`) and left-padded;
    a row ends at any of the format's stop ids. The engine's log-probs are taken at
    ``options.temperature``; when they are not the trainer's, the trainer's are computed
    too and the mismatch weights set (:func:`correct_mismatch`). With ``reference`` and a
    reference policy, the reference log-probs and the per-token KL (:func:`reference_forward`).
    Seconds go to ``batch.timings`` (``time/rollout/generation``, ``.../trainer_logprobs``,
    ``.../ref``).
    """
    start = time.perf_counter()
    fmt = policy_format(ctx)
    max_prompt = int(ctx.cfg.task.max_prompt_tokens)
    ids, mask, texts = encode_prompts(fmt, ctx.task, records, max_prompt)
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    engine = rollout_engine(ctx)
    rows = global_rows(ctx, ids.shape[0])
    out = engine.generate(ctx, ids, mask, fmt.stop_ids, rows, options)
    generated = time.perf_counter()
    batch = Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=out.response_ids,
        response_mask=out.response_mask.float(),
        group_ids=torch.arange(len(records), device=ctx.device).repeat_interleave(group),
        prompts=[t for t in texts for _ in range(group)],
        responses=decode_responses(
            ctx.tokenizer, out.response_ids, out.response_mask, fmt.stop_ids
        ),
        records=[r for r in records for _ in range(group)],
        finished=out.finished,
        logprobs=out.logprobs,
    )
    batch.timings["time/rollout/generation"] = generated - start
    if not engine.trainer_logprobs or options.temperature != float(ctx.cfg.rl.temperature):
        start = time.perf_counter()
        correct_mismatch(ctx, batch)
        batch.timings["time/rollout/trainer_logprobs"] = time.perf_counter() - start
    if reference:
        reference_forward(ctx, batch)
    return batch


def encode_responses(ctx: RunContext, records: Sequence[Any], responses: Sequence[str]) -> Rollout:
    """A batch of given responses to ``records`` in the policy's format (one row per record,
    each its own group), responses closed by the format's end-of-turn token or EOS."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    fmt = policy_format(ctx)
    max_prompt = int(ctx.cfg.task.max_prompt_tokens)
    ids, mask, texts = encode_prompts(fmt, ctx.task, records, max_prompt)
    encoded = fmt.encode_responses(conversations(ctx.task, records, fmt), responses)
    width = max([len(r) for r in encoded] + [1])
    pad = int(ctx.tokenizer.pad_token_id or 0)
    r_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    r_mask = torch.zeros((len(encoded), width), dtype=torch.float32)
    for i, row in enumerate(encoded):
        r_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        r_mask[i, : len(row)] = 1.0
    device = ctx.device
    return Rollout(
        prompt_ids=ids.to(device),
        prompt_mask=mask.to(device),
        response_ids=r_ids.to(device),
        response_mask=r_mask.to(device),
        group_ids=torch.arange(len(records), device=device),
        prompts=texts,
        responses=list(responses),
        records=list(records),
        finished=torch.ones(len(records), dtype=torch.bool, device=device),
    )


def reference_forward(ctx: RunContext, batch: Rollout) -> None:
    """Set ``batch.ref_logprobs`` and the per-token ``batch.kl`` (``ctx.kl_estimator`` of
    ``logprobs`` against them), when the run has a reference policy. Logs
    ``time/rollout/ref``."""
    if ctx.ref_policy is None:
        return
    start = time.perf_counter()
    batch.ref_logprobs = scored_logprobs(ctx, ctx.ref_policy, batch)
    if batch.logprobs is not None:
        kl = kl_penalty(batch.logprobs, batch.ref_logprobs, ctx.kl_estimator)
        batch.kl = torch.where(batch.response_mask != 0, kl, 0.0)
    batch.timings["time/rollout/ref"] = time.perf_counter() - start


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
