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
from alignkit.stages.active import check_selection, prompt_order
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


def label_cost(fmt: str, k: int) -> int:
    """Labels a prompt with ``k`` distinct responses costs in ``fmt``: each comparison a
    ranking or the pairwise format implies (``k (k - 1) / 2``), or one rating per response."""
    return k if fmt == "ratings" else k * (k - 1) // 2


def budgeted(
    fmt: str, records: Sequence[Any], responses: Sequence[list[str]], budget: int | None
) -> list[tuple[Any, list[str]]]:
    """The (record, responses) pairs to label, in order: prompts with something to compare
    (two or more distinct responses, one for ratings), until ``feedback.max_labels`` (None:
    no limit) would be exceeded."""
    out, spent = [], 0
    for record, group in zip(records, responses, strict=True):
        if fmt != "ratings" and len(group) < 2:
            continue  # nothing to compare
        cost = label_cost(fmt, len(group))
        if budget is not None and spent + cost > int(budget):
            break
        out.append((record, group))
        spent += cost
    return out


def run_feedback(ctx: RunContext, policy_path: str | Path | None = None) -> dict[str, float]:
    """Sample, label and write ``<run_dir>/feedback/<format>.jsonl``; return the summary."""
    fcfg = ctx.cfg.feedback
    fmt = str(fcfg.format)
    if fmt not in FORMATS:
        raise ConfigError(f"feedback.format={fmt!r}; expected one of {', '.join(FORMATS)}")
    annotator = build_annotator(ctx)
    check_selection(ctx)  # before sampling: a missing model fails at once
    path = resolve_policy(ctx, policy_path)
    policy, tokenizer = load_model(ctx, path)
    records = feedback_prompts(ctx)
    console.print(
        f"feedback: sampling {len(records)} prompts x {fcfg.samples_per_prompt} from {path}"
    )
    responses = sample_responses(ctx, policy, tokenizer, records)

    if fcfg.get("max_labels") is not None:
        # A budget stops partway: spend it on prompts in a seeded order (kinds in proportion),
        # or those the reward model is least sure about first (feedback.selection).
        order = prompt_order(ctx, records, responses, int(fcfg.seed))
        records, responses = [records[i] for i in order], [responses[i] for i in order]
    labelled = budgeted(fmt, records, responses, fcfg.get("max_labels"))
    feedback, golds, batch = [], [], []
    for record, group in labelled:
        prompt = ctx.task.format_prompt(record)
        prompt_id = getattr(record, "id", None)
        if isinstance(annotator, BatchAnnotator):
            item_id = str(prompt_id if prompt_id is not None else len(batch))
            item = {"id": item_id, "prompt": prompt, "prompt_id": prompt_id, "responses": group}
            batch.append(item)
        else:
            feedback += label(annotator, fmt, record, prompt, group, prompt_id)
        if hasattr(ctx.task, "gold_score"):
            golds += [float(ctx.task.gold_score(record, r)) for r in group]
    if isinstance(annotator, BatchAnnotator) and batch:  # people label the whole set at once
        feedback += annotator.label_batch(fmt, batch)
    skipped = sum(1 for g in responses if fmt != "ratings" and len(g) < 2)
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
        "feedback_labels": float(sum(label_cost(fmt, len(g)) for _, g in labelled)),
        "feedback_prompts": float(len(labelled)),
        "feedback_responses": float(sum(len(g) for g in responses)),
        "feedback_skipped_prompts": float(skipped),
    }
    if golds:
        summary["feedback_gold_mean"] = sum(golds) / len(golds)
    ctx.tracker.log(summary, step=0, stage="feedback")
    return summary
