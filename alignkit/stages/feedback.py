"""``stage=feedback``: sample K responses per prompt from a policy and have an annotator label
them.

The policy (by default the SFT policy) samples ``feedback.samples_per_prompt`` responses to
each prompt of the chosen task split at ``feedback.temperature``; identical responses to one
prompt are merged (a comparison of a text with itself says nothing). The ``annotator``
component named by ``feedback.annotator`` (the built-in ``simulated_human``: the task's gold
oracle plus seeded noise) labels them in ``feedback.format``, and the records are written
atomically to ``<run_dir>/feedback/<format>.jsonl`` (formats in ``docs/feedback.md``).

Summary keys: ``feedback_records``, ``feedback_prompts``, ``feedback_responses``,
``feedback_skipped_prompts`` (fewer than two distinct responses), ``feedback_gold_mean`` (mean
gold score of the sampled responses, when the task has an oracle), ``feedback_duplicates``,
``feedback_empty_responses``, ``feedback_identical_pairs``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.data.feedback import (
    FORMATS,
    Annotator,
    BatchAnnotator,
    check_feedback,
    label,
    write_feedback_jsonl,
)
from alignkit.data.prompts import prompt_format
from alignkit.errors import ConfigError
from alignkit.evaluation import sample_policy
from alignkit.progress import print_report, sample_with_progress
from alignkit.stages.common import load_model
from alignkit.tracking import console

SPLITS: tuple[str, ...] = ("train", "eval", "all")


def resolve_policy(
    ctx: RunContext,
    policy_path: str | Path | None = None,
    *,
    stage: str = "feedback",
    key: str = "feedback.policy",
) -> str:
    """``policy_path``, else ``feedback.policy``, ``model.path``, else ``<run_dir>/sft``.

    ``stage`` and ``key`` (the config key that ``policy_path`` came from) name the error.
    """
    for value in (policy_path, ctx.cfg.feedback.policy, ctx.cfg.model.path):
        if value:
            return str(value)
    sft = ctx.run_dir / "sft"
    if (sft / "config.json").is_file():
        return str(sft)
    raise ConfigError(
        f"stage={stage} needs a policy to sample from: set {key} or model.path "
        "(e.g. the SFT policy folder)"
    )


def feedback_prompts(ctx: RunContext) -> list[Any]:
    """The task records of ``feedback.split``, a seeded subset of ``feedback.num_prompts``."""
    fcfg = ctx.cfg.feedback
    return split_records(ctx, "feedback", str(fcfg.split), fcfg.num_prompts, int(fcfg.seed))


def split_records(
    ctx: RunContext, key: str, split: str, num_prompts: int | None, seed: int
) -> list[Any]:
    """The task's ``split`` prompts (train | eval | all), a seeded subset of ``num_prompts``.

    ``key`` is the config node the values came from, named in errors.
    """
    if split not in SPLITS:
        raise ConfigError(f"{key}.split={split!r}; expected one of {', '.join(SPLITS)}")
    task = ctx.task
    records = {
        "train": task.train_prompts,
        "eval": task.eval_prompts,
        "all": lambda: [*task.train_prompts(), *task.eval_prompts()],
    }[split]()
    if num_prompts is not None and int(num_prompts) < len(records):
        # Sampling (not a prefix) keeps the prompt kinds in proportion.
        records = random.Random(seed).sample(records, int(num_prompts))
    if not records:
        raise ConfigError(f"{key}.split={split!r} has no prompts")
    return records


def build_annotator(ctx: RunContext) -> Annotator | BatchAnnotator:
    """The ``annotator`` component named by ``feedback.annotator``, built with ``ctx``: an
    :class:`Annotator` (one prompt at a time) or a :class:`BatchAnnotator` (the whole set)."""
    annotator = ctx.registry.build("annotator", str(ctx.cfg.feedback.annotator), ctx=ctx)
    if callable(getattr(annotator, "label_batch", None)):
        return annotator
    missing = [m for m in ("compare", "rank", "rate") if not callable(getattr(annotator, m, None))]
    if missing:
        raise ConfigError(
            f"feedback.annotator={ctx.cfg.feedback.annotator!r} lacks {', '.join(missing)}"
        )
    return annotator


def sample_responses(
    ctx: RunContext, policy: Any, tokenizer: Any, records: list[Any]
) -> list[list[str]]:
    """K sampled responses per record (distinct, in sampling order)."""
    fcfg = ctx.cfg.feedback
    k = int(fcfg.samples_per_prompt)
    if k < 1:
        raise ConfigError(f"feedback.samples_per_prompt must be >= 1, got {k}")
    repeated = [r for r in records for _ in range(k)]
    generator = torch.Generator().manual_seed(int(fcfg.seed))
    fmt = prompt_format(ctx.cfg, tokenizer, policy)

    def sample(part: Sequence[Any]) -> Any:
        return sample_policy(
            policy,
            tokenizer,
            ctx.task,
            part,
            max_new_tokens=int(fcfg.max_new_tokens),
            temperature=float(fcfg.temperature),
            batch_size=int(fcfg.batch_size),
            max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
            generator=generator,
            fmt=fmt,
        )

    # In slices of whole batches, so progress shows (same samples as one call).
    samples = sample_with_progress(
        "feedback sampling", repeated, int(fcfg.batch_size), int(tokenizer.pad_token_id), sample
    )
    out = samples.responses
    return [list(dict.fromkeys(out[i * k : (i + 1) * k])) for i in range(len(records))]


def run_feedback(ctx: RunContext, policy_path: str | Path | None = None) -> dict[str, float]:
    """Sample, label and write ``<run_dir>/feedback/<format>.jsonl``; return the summary."""
    fcfg = ctx.cfg.feedback
    fmt = str(fcfg.format)
    if fmt not in FORMATS:
        raise ConfigError(f"feedback.format={fmt!r}; expected one of {', '.join(FORMATS)}")
    annotator = build_annotator(ctx)
    path = resolve_policy(ctx, policy_path)
    policy, tokenizer = load_model(ctx, path)
    records = feedback_prompts(ctx)
    console.print(
        f"feedback: sampling {len(records)} prompts x {fcfg.samples_per_prompt} from {path}"
    )
    responses = sample_responses(ctx, policy, tokenizer, records)

    feedback, skipped, golds, batch = [], 0, [], []
    for record, group in zip(records, responses, strict=True):
        if fmt != "ratings" and len(group) < 2:
            skipped += 1  # nothing to compare
            continue
        prompt = ctx.task.format_prompt(record)
        prompt_id = getattr(record, "id", None)
        if hasattr(annotator, "label_batch"):
            item_id = str(prompt_id if prompt_id is not None else len(batch))
            batch.append(
                {"id": item_id, "prompt": prompt, "prompt_id": prompt_id, "responses": group}
            )
        else:
            feedback += label(annotator, fmt, record, prompt, group, prompt_id)
        if hasattr(ctx.task, "gold_score"):
            golds += [float(ctx.task.gold_score(record, r)) for r in group]
    if isinstance(annotator, BatchAnnotator) and batch:  # people label the whole set at once
        feedback += annotator.label_batch(fmt, batch)
    out = ctx.stage_dir("feedback") / f"{fmt}.jsonl"
    for line, rec in enumerate(feedback, start=1):
        rec.source = f"{out}:{line}"  # so the report points into the written file
    if ctx.is_main_process:
        write_feedback_jsonl(out, feedback)
    report = check_feedback(feedback)
    print_report("feedback", report.lines())
    console.print(f"feedback written to {out}")
    summary = {
        **report.metrics(),
        "feedback_prompts": float(len(records) - skipped),
        "feedback_responses": float(sum(len(g) for g in responses)),
        "feedback_skipped_prompts": float(skipped),
    }
    if golds:
        summary["feedback_gold_mean"] = sum(golds) / len(golds)
    ctx.tracker.log(summary, step=0, stage="feedback")
    return summary
