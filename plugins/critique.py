"""``reward=critique``: a judge model critiques each response against principles; its verdict
probability is the reward.

For each rollout the judge (``reward.critique.judge``: a local causal LM or an
OpenAI-compatible endpoint) writes a critique conditioned on the principles of its template
(``conf/prompts/<template>.yaml``), then a verdict; the component ``critique`` is
``P(favourable verdict | prompt, response, critique)`` from the judge's log-probs,
renormalised over the verdict options, or the parsed verdict where there are none
(:mod:`alignkit.judges.verdict`). With ``per_principle`` each principle is judged apart and
the scores combined with the principles' weights; ``mode=pairwise`` rewards each sample with
its mean win probability against the other samples of its prompt.

Per-principle means, the fraction of verdicts read from log-probs and of fallbacks are logged
as ``critique/*`` every step; every ``log_every`` steps a sample of critiques with prompts,
responses, scores (and the gold score) goes to ``<run_dir>/critiques.jsonl`` and to a W&B
table ``critiques_step_<step>``.

The plugin also registers ``stage=judge`` (train the built-in task's tiny judge) and
``stage=critique_revision`` (Constitutional AI's critique-and-revise data). See
``docs/critique.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import store_reward
from alignkit.errors import ConfigError
from alignkit.judges.base import Judgement
from alignkit.judges.config import CritiqueRewardConfig, build_critique_judge, critique_config
from alignkit.judges.critic import CritiqueJudge
from alignkit.registry import ComponentRegistry
from alignkit.rewards.learned import rollout_texts

NAME = "critique"
_JUDGE = f"{NAME}/judge"
_STATS = f"{NAME}/stats"


@dataclass
class _StepStats:
    """This step's judging statistics, added to the step's metrics in ``step_end``.

    A plain object, so the engine's checkpoints (JSON-able ``ctx.state`` only) skip it.
    """

    metrics: dict[str, float] = field(default_factory=dict)


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_reward(config_store, NAME, CritiqueRewardConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    from alignkit.stages.critique_revision import run_critique_revision
    from alignkit.stages.judge import run_judge_stage

    registry.add("stage", "judge", run_judge_stage)
    registry.add("stage", "critique_revision", run_critique_revision)


def judge_for(ctx: RunContext) -> CritiqueJudge:
    """The run's judge, built once from ``reward.critique`` and kept in ``ctx.state``."""
    if _JUDGE not in ctx.state:
        ctx.state[_JUDGE] = build_critique_judge(critique_config(ctx.cfg), ctx.device)
    return ctx.state[_JUDGE]


@hookimpl
def run_start(ctx: RunContext) -> None:
    node = critique_config(ctx.cfg)
    if str(node.mode) == "pairwise" and int(ctx.cfg.rl.samples_per_prompt) < 2:
        raise ConfigError(
            "reward.critique.mode=pairwise compares the samples of each prompt: set "
            "rl.samples_per_prompt >= 2"
        )
    judge_for(ctx)  # load once, and fail before the first step if the judge is unusable


@hookimpl
def run_end(ctx: RunContext, summary: dict[str, float]) -> None:
    judge = ctx.state.pop(_JUDGE, None)
    if judge is not None:
        judge.close()


def pairwise_rewards(
    judge: CritiqueJudge,
    prompts: Sequence[str],
    responses: Sequence[str],
    groups: torch.Tensor,
    *,
    both_orders: bool = True,
) -> tuple[torch.Tensor, list[str], int]:
    """Each row's mean probability of beating the other rows of its group.

    ``r_i = 1/(G_i - 1) sum_{j in group(i), j != i} P(y_i > y_j)`` with
    ``P(y_j > y_i) = 1 - P(y_i > y_j)``, every unordered pair judged once (twice with
    ``both_orders``). Returns (B,) rewards, a critique per row (of its first comparison) and
    the number of fallbacks.
    """
    pairs = [
        (i, j)
        for i in range(len(prompts))
        for j in range(i + 1, len(prompts))
        if int(groups[i]) == int(groups[j])
    ]
    if not pairs:
        raise ConfigError("reward.critique.mode=pairwise found no two samples of one prompt")
    judged = judge.compare(
        [prompts[i] for i, _ in pairs],
        [responses[i] for i, _ in pairs],
        [responses[j] for _, j in pairs],
        both_orders=both_orders,
    )
    wins = torch.zeros(len(prompts))
    counts = torch.zeros(len(prompts))
    critiques = [""] * len(prompts)
    for (i, j), res in zip(pairs, judged, strict=True):
        wins[i] += res.prob_a
        wins[j] += 1.0 - res.prob_a
        counts[i] += 1
        counts[j] += 1
        critiques[i] = critiques[i] or res.critique
    fallbacks = sum(r.source == "fallback" for r in judged)
    return wins / counts.clamp(min=1), critiques, fallbacks


def _stats(judged: Sequence[Judgement], seconds: float) -> dict[str, float]:
    n = max(len(judged), 1)
    out = {
        "critique/logprob_rate": sum(j.source == "logprobs" for j in judged) / n,
        "critique/fallback_rate": sum(j.source == "fallback" for j in judged) / n,
        "critique/seconds": seconds,
    }
    names = {name for j in judged for name in j.principles}
    for name in sorted(names):
        out[f"critique/{name}"] = sum(j.principles.get(name, 0.0) for j in judged) / n
    return out


@hookimpl
def reward(ctx: RunContext, batch: Rollout) -> dict[str, torch.Tensor]:
    node = critique_config(ctx.cfg)
    judge = judge_for(ctx)
    prompts, responses = rollout_texts(batch, ctx.tokenizer)
    t = time.perf_counter()
    if str(node.mode) == "pairwise":
        scores, critiques, fallbacks = pairwise_rewards(
            judge, prompts, responses, batch.group_ids, both_orders=bool(node.both_orders)
        )
        stats = {
            "critique/fallbacks": float(fallbacks),
            "critique/seconds": time.perf_counter() - t,
        }
        sources = ["pairwise"] * len(prompts)
    else:
        judged = judge.score(prompts, responses)
        scores = torch.tensor([j.score for j in judged], dtype=torch.float32)
        critiques = [j.critique for j in judged]
        sources = [j.source for j in judged]
        stats = _stats(judged, time.perf_counter() - t)
    ctx.state[_STATS] = _StepStats(stats)
    every = int(node.log_every)
    if every > 0 and ctx.step % every == 0 and ctx.is_main_process:
        log_critiques(
            ctx,
            batch,
            prompts,
            responses,
            scores.tolist(),
            critiques,
            sources,
            int(node.log_samples),
        )
    return {NAME: scores}


@hookimpl
def step_end(ctx: RunContext, step: int, batch: Rollout, metrics: dict[str, float]) -> None:
    stats = ctx.state.pop(_STATS, None)
    if stats is not None:
        metrics.update(stats.metrics)


def log_critiques(
    ctx: RunContext,
    batch: Rollout,
    prompts: Sequence[str],
    responses: Sequence[str],
    scores: Sequence[float],
    critiques: Sequence[str],
    sources: Sequence[str],
    n: int,
) -> None:
    """A sample of critiques to ``<run_dir>/critiques.jsonl`` and a W&B table."""
    gold = getattr(ctx.task, "gold_score", None)
    columns = ["step", "prompt", "response", "score", "source", "critique"]
    if gold is not None and batch.records:
        columns.append("gold")
    rows: list[list[Any]] = []
    for i in range(min(n, len(prompts))):
        row: list[Any] = [ctx.step, prompts[i], responses[i], round(float(scores[i]), 4)]
        row += [sources[i], critiques[i]]
        if len(columns) == 7:
            row.append(round(float(gold(batch.records[i], responses[i])), 4))  # type: ignore[misc]
        rows.append(row)
    ctx.tracker.log_table(f"critiques_step_{ctx.step:06d}", columns, rows)
    path = ctx.run_dir / "critiques.jsonl"
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(zip(columns, row, strict=True))) + "\n")
