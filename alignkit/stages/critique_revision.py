"""``stage=critique_revision``: the judge critiques and then revises policy responses.

The supervised stage of Constitutional AI (Bai et al. 2022): sample responses from a policy,
have the judge (``reward.critique.judge``) critique each against the principles and rewrite
it, then keep

* ``<run_dir>/critique_revision/pairwise.jsonl``: (revised = chosen, original = rejected)
  pairs in the pairwise feedback format that ``stage=reward_model`` reads
  (:mod:`alignkit.data.feedback`);
* ``<run_dir>/critique_revision/demonstrations.jsonl``: ``{"prompt", "response"}`` lines of
  the revised responses, the format of ``task.sft_data`` (``stage=sft``);
* ``<run_dir>/critique_revision/critiques.jsonl``: every original, critique and revision
  (with gold scores when the task has an oracle), for inspection.

A revision identical to the original is no preference and is left out of the pairs (and of
the demonstrations unless ``reward.critique.revision.keep_unchanged``). Settings live in
``reward.critique.revision``.

Summary keys: ``revision_samples``, ``revision_pairs``, ``revision_demonstrations``,
``revision_failed``; with a gold oracle ``revision_gold_original``, ``revision_gold_revised``
and ``revision_gold_improved`` (fraction of pairs whose revision scores higher).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.data.feedback import PairwiseFeedback, write_feedback_jsonl
from alignkit.errors import ConfigError
from alignkit.evaluation import sample_policy
from alignkit.io import atomic_write_text
from alignkit.judges.config import build_critique_judge, critique_config
from alignkit.judges.critic import CritiqueJudge
from alignkit.stages.common import load_model
from alignkit.stages.feedback import resolve_policy, split_records
from alignkit.tracking import console


def _records(ctx: RunContext, rcfg: Any) -> list[Any]:
    return split_records(
        ctx, "reward.critique.revision", str(rcfg.split), rcfg.num_prompts, int(rcfg.seed)
    )


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def run_critique_revision(ctx: RunContext) -> dict[str, float]:
    """Sample, critique, revise; write pairs, demonstrations and critiques; return a summary."""
    node = critique_config(ctx.cfg)
    rcfg = node.revision
    k = int(rcfg.samples_per_prompt)
    if k < 1:
        raise ConfigError(f"reward.critique.revision.samples_per_prompt must be >= 1, got {k}")
    path = resolve_policy(
        ctx, rcfg.policy, stage="critique_revision", key="reward.critique.revision.policy"
    )
    policy, tokenizer = load_model(ctx, path)
    records = [r for r in _records(ctx, rcfg) for _ in range(k)]
    console.print(f"critique_revision: {len(records)} samples from {path}")
    samples = sample_policy(
        policy,
        tokenizer,
        ctx.task,
        records,
        max_new_tokens=int(rcfg.max_new_tokens),
        temperature=float(rcfg.temperature),
        max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
        generator=torch.Generator().manual_seed(int(rcfg.seed)),
    )
    judge = build_critique_judge(node, ctx.device)
    try:
        return write_revisions(ctx, records, samples.responses, judge)
    finally:
        judge.close()


def write_revisions(
    ctx: RunContext, records: list[Any], responses: list[str], judge: CritiqueJudge
) -> dict[str, float]:
    """Critique and revise ``responses``; write the three files; return the summary."""
    rcfg = critique_config(ctx.cfg).revision
    prompts = [ctx.task.format_prompt(r) for r in records]
    revised = judge.revise(prompts, responses, max_tokens=int(rcfg.max_revision_tokens))
    gold = getattr(ctx.task, "gold_score", None)
    pairs, demos, log = [], [], []
    failed, improved, g_orig, g_rev = 0, 0, [], []
    for record, prompt, original, (judged, text) in zip(
        records, prompts, responses, revised, strict=True
    ):
        entry: dict[str, Any] = {
            "prompt": prompt,
            "original": original,
            "critique": judged.critique,
        }
        entry["revised"] = text
        if text is None or not text.strip():
            failed += 1
            log.append(entry)
            continue
        changed = text.strip() != original.strip()
        pid = getattr(record, "id", None)
        if changed:
            pairs.append(PairwiseFeedback(prompt, text, original, prompt_id=pid))
        if changed or bool(rcfg.keep_unchanged):
            demos.append({"prompt": prompt, "response": text})
        if gold is not None:
            entry["gold_original"], entry["gold_revised"] = (
                gold(record, original),
                gold(record, text),
            )
            g_orig.append(entry["gold_original"])
            g_rev.append(entry["gold_revised"])
            improved += int(changed and entry["gold_revised"] > entry["gold_original"])
        log.append(entry)

    out = ctx.stage_dir("critique_revision")
    if ctx.is_main_process:
        write_feedback_jsonl(out / "pairwise.jsonl", pairs)
        atomic_write_text(out / "demonstrations.jsonl", _jsonl(demos))
        atomic_write_text(out / "critiques.jsonl", _jsonl(log))
    console.print(f"critique_revision: {len(pairs)} pairs, {len(demos)} demonstrations in {out}")
    summary = {
        "revision_samples": float(len(records)),
        "revision_pairs": float(len(pairs)),
        "revision_demonstrations": float(len(demos)),
        "revision_failed": float(failed),
    }
    if g_orig:
        summary["revision_gold_original"] = sum(g_orig) / len(g_orig)
        summary["revision_gold_revised"] = sum(g_rev) / len(g_rev)
        summary["revision_gold_improved"] = improved / max(len(pairs), 1)
    ctx.tracker.log(summary, step=0, stage="critique_revision")
    return summary
