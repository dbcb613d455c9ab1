"""``stage=judge``: a tiny judge for the built-in task, trained on the synthetic critiques of
:mod:`alignkit.tasks.judge_data` with the SFT stage's loss.

:func:`build_judge` trains a small GPT-2 on the task's synthetic critiques, verdicts,
pairwise comparisons and revisions, and writes an HF folder; :func:`run_judge_stage` builds it
into ``reward.critique.build.out`` (default ``<run_dir>/judge``) and reports its rank
correlation with gold on held-out prompts.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import ConfigError
from alignkit.io import atomic_write_dir, atomic_write_text
from alignkit.judges.config import critique_config
from alignkit.judges.critic import CritiqueJudge
from alignkit.judges.local import LocalJudge
from alignkit.judges.templates import JudgeTemplate, load_template
from alignkit.models import TinyModelSpec, build_tiny_model, load_causal_lm
from alignkit.rl.optim import adamw
from alignkit.stages.common import linear_warmup_decay
from alignkit.stages.sft import collate, sft_loss
from alignkit.tasks.assist import AssistTask, PromptRecord
from alignkit.tasks.judge_data import evaluate_judge, heldout_pairs, judge_examples
from alignkit.tracking import console

__all__ = ["build_judge", "encode_text_pairs", "run_judge_stage"]


def _judge_corpus(examples: Sequence[tuple[str, str]], task: AssistTask) -> list[str]:
    return [*task.corpus(), *(f"{c} {t}" for c, t in examples)]


def build_judge(
    task: AssistTask,
    template: JudgeTemplate,
    out: Path,
    cfg: Any,
    *,
    seed: int = 0,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Generate synthetic data, train a tiny GPT-2 judge on it, save it to ``out``.

    ``cfg`` is a :class:`alignkit.judges.config.JudgeBuildConfig`. Returns the training
    summary (examples, final loss, seconds).
    """
    t0 = time.perf_counter()
    records = task.train_prompts()
    examples = judge_examples(
        task,
        records,
        template,
        int(cfg.examples),
        seed=seed,
        pairwise_fraction=float(cfg.pairwise_fraction),
        revision_fraction=float(cfg.revision_fraction),
    )
    spec = TinyModelSpec(
        vocab_size=int(cfg.vocab_size),
        n_layer=int(cfg.n_layer),
        n_head=int(cfg.n_head),
        n_embd=int(cfg.n_embd),
        n_positions=int(cfg.n_positions),
        seed=seed,
    )
    scratch = out.parent / f".{out.name}.base"
    build_tiny_model(scratch, _judge_corpus(examples, task), spec)
    model, tokenizer = load_causal_lm(scratch)
    data = encode_text_pairs(tokenizer, examples, max_length=int(cfg.n_positions))
    loss = _train(model, tokenizer, data, cfg, seed, log)
    model.eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"template": template.source, "examples": len(examples), "spec": spec.__dict__}
        (tmp / "judge_info.json").write_text(json.dumps(info, indent=2) + "\n")

    atomic_write_dir(out, fill)
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "judge_examples": float(len(examples)),
        "judge_loss": loss,
        "judge_train_seconds": time.perf_counter() - t0,
    }


def encode_text_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Ids of ``context + " " + target + EOS`` and where the target starts.

    The judge's contexts are verbatim text (no chat template) and the longest of them lose
    tokens from the left, the instructions before the response judged, which keeps the verdict
    and its evidence in view.
    """
    encoded = []
    for context, target in pairs:
        p = tokenizer(context, add_special_tokens=False)["input_ids"]
        r = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        ids = (p + r + [tokenizer.eos_token_id])[-max_length:]
        encoded.append((ids, max(0, len(ids) - len(r) - 1)))
    return encoded


def _train(
    model: torch.nn.Module,
    tokenizer: Any,
    data: list[tuple[list[int], int]],
    cfg: Any,
    seed: int,
    log: Callable[[int, dict[str, float]], None] | None,
) -> float:
    """The SFT objective (token-mean NLL of the critique and verdict) on shuffled batches."""
    steps, bs = int(cfg.steps), int(cfg.batch_size)
    optimizer = adamw(model.parameters(), lr=float(cfg.lr))
    scheduler = linear_warmup_decay(optimizer, int(cfg.warmup_steps), steps)
    rng = random.Random(seed)
    batches: list[list[int]] = []
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        if not batches:
            batches = _length_buckets([len(ids) for ids, _ in data], bs, rng)
        idx = batches.pop()
        ids, mask, labels = collate([data[i] for i in idx], tokenizer.pad_token_id)
        loss = sft_loss(model, ids, mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if log is not None and (step % int(cfg.log_every) == 0 or step == steps - 1):
            log(step, {"loss": loss_value, "lr": scheduler.get_last_lr()[0]})
    return loss_value


def _length_buckets(lengths: list[int], bs: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar length (less padding, ~2-3x faster on CPU).

    The examples are shuffled, cut into windows of 50 batches, each window sorted by length
    and split into batches; the batch order is shuffled again, so no length is seen in order.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * bs
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
    rng.shuffle(batches)
    return batches


def write_eval(path: Path, metrics: dict[str, float]) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def run_judge_stage(ctx: Any) -> dict[str, float]:
    """``stage=judge``: build the tiny judge into ``reward.critique.build.out`` (default
    ``<run_dir>/judge``) and report its rank correlation with gold on held-out prompts."""
    if not isinstance(ctx.task, AssistTask):
        raise ConfigError(
            "stage=judge trains a judge from the built-in assist task's gold oracle "
            f"(task.name=assist); this run's task is {type(ctx.task).__name__}"
        )
    node = critique_config(ctx.cfg)
    cfg = node.build
    template = load_template(str(node.judge.template))
    out = Path(cfg.out) if cfg.out else ctx.run_dir / "judge"
    console.print(f"judge: {cfg.examples} synthetic examples, {cfg.steps} steps -> {out}")
    summary = build_judge(
        ctx.task,
        template,
        out,
        cfg,
        seed=int(ctx.cfg.seed),
        log=lambda step, m: ctx.tracker.log(m, step=step, stage="judge"),
    )
    backend = LocalJudge(
        str(out), device=ctx.device, max_critique_tokens=int(node.judge.max_critique_tokens)
    )
    judge = CritiqueJudge(backend, template, per_principle=True)
    records = ctx.task.eval_prompts()
    if cfg.eval_prompts is not None:
        records = records[: int(cfg.eval_prompts)]
    pairs = heldout_pairs(ctx.task, records, seed=int(ctx.cfg.seed) + 1)
    metrics = evaluate_judge(judge, ctx.task, pairs)
    _log_samples(ctx, judge, pairs[:: max(1, len(pairs) // 16)][:16])
    result = {**summary, **metrics}
    write_eval(ctx.run_dir / "judge_eval.json", result)
    console.print(f"judge saved to {out}")
    return result


def _log_samples(ctx: Any, judge: CritiqueJudge, pairs: Sequence[tuple[PromptRecord, str]]) -> None:
    prompts = [ctx.task.format_prompt(r) for r, _ in pairs]
    judged = judge.score(prompts, [s for _, s in pairs])
    rows = [
        [r.text, s, round(j.score, 4), round(ctx.task.gold_score(r, s), 4), j.critique]
        for (r, s), j in zip(pairs, judged, strict=True)
    ]
    ctx.tracker.log_table(
        "judge_eval_samples", ["prompt", "response", "score", "gold", "critique"], rows
    )
