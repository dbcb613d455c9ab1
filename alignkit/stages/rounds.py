"""``pipeline.rounds=N``: continuous improvement, N rounds of sample -> label -> reward model
-> RL in one run directory.

Round 1 is the one-round pipeline's feedback -> reward model -> RL from the SFT policy, with
its share of the label budget and of the RL steps. Each later round r:

1. samples ``feedback.samples_per_prompt`` responses per prompt from round r-1's policy (the
   labels go where the policy now is) and has the annotator label them, spending round r's
   share of ``feedback.max_labels`` on the prompts ``feedback.selection`` puts first: by
   default a seeded random order; ``disagreement`` asks about the prompts round r-1's
   reward-model ensemble disagrees on most (:mod:`alignkit.stages.active`);
2. extends round r-1's reward model (``reward_model.init``, not a fresh head) on every label
   given so far, every round's, so it stays right on the older policies' samples too;
3. runs RL from round r-1's policy, scored by that reward model, with the KL still to the SFT
   policy: the reference stays put, so N rounds spend the one-round KL budget, not N times it.

``feedback.max_labels`` and ``rl.steps`` are totals, split evenly across rounds (the first
rounds take a remainder), so ``rounds=1`` and ``rounds=3`` compare at the same labelling cost
and the same RL compute. An algorithm that is not scored (offline DPO) trains each round on
that round's feedback instead (iterative DPO), with no reward model unless the evaluation
needs one.

Layout: ``<run_dir>/round_<r>/{feedback,reward_model,rl}``. Every round's policy is evaluated
against the SFT policy; the summary gains ``round_<r>/<key>`` for the evaluation's keys,
``round_<r>/labels`` (labels spent up to and including round r: feedback and policy
selection) and ``round_<r>/rm_gold_agreement``. Metrics records carry ``round``, and the RL
steps count on across rounds, so the curves of a multi-round run read as one run.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import open_dict

from alignkit.context import RunContext
from alignkit.errors import ConfigError
from alignkit.needs import Artifacts
from alignkit.stages.active import check_selection
from alignkit.tracking import console

__all__ = ["RoundTracker", "round_context", "run_rounds", "shares"]

EVAL_KEYS = ("gold_win_rate", "gold_score_policy", "kl_to_sft", "win_rate", "rm_win_rate")


def shares(total: int, n: int) -> list[int]:
    """``total`` split into ``n`` near-equal parts, the first ones taking the remainder."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class RoundTracker:
    """The run's tracker for one round: every record gets ``round``, RL steps count on from
    the earlier rounds' (``offset``), and tables get a ``round_<r>_`` prefix."""

    def __init__(self, tracker: Any, index: int, offset: int) -> None:
        self._tracker, self.index, self.offset = tracker, index, offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)

    def _step(self, stage: str, step: int) -> int:
        return step + self.offset if stage == "rl" else step

    def log(self, metrics: Any, *, step: int, stage: str) -> None:
        self._tracker.log(
            {**metrics, "round": self.index}, step=self._step(stage, step), stage=stage
        )

    def rewind(self, stage: str, step: int) -> int:
        return self._tracker.rewind(stage, self._step(stage, step))

    def log_table(self, name: str, columns: Any, rows: Any, **kwargs: Any) -> None:
        self._tracker.log_table(f"round_{self.index}_{name}", columns, rows, **kwargs)


def round_context(ctx: RunContext, index: int, previous_rm: Path | None, offset: int) -> RunContext:
    """The context of round ``index`` (1-based) of ``pipeline.rounds``: its folder, its share
    of the label budget and RL steps, a fresh feedback seed (other samples, and with a budget
    other prompts), and the previous round's reward model to extend and select with."""
    n = int(ctx.cfg.pipeline.rounds)
    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        cfg.rl.steps = shares(int(ctx.cfg.rl.steps), n)[index - 1]
        budget = ctx.cfg.feedback.max_labels
        if budget is not None:
            cfg.feedback.max_labels = shares(int(budget), n)[index - 1]
        cfg.feedback.seed = int(ctx.cfg.feedback.seed) + index - 1
        if previous_rm is None:
            cfg.feedback.selection = "random"  # nothing to select with yet
        else:
            cfg.feedback.selection_model = str(previous_rm)
            cfg.reward_model.init = str(previous_rm)
    return dataclasses.replace(
        ctx,
        cfg=cfg,
        run_dir=ctx.stage_dir(f"round_{index}"),
        tracker=RoundTracker(ctx.tracker, index, offset),
        state={},  # plugins cache their reward models here: each round scores with its own
    )


def check_rounds(ctx: RunContext, learned: list[str], trains_rm: bool) -> int:
    """``pipeline.rounds``, checked against what a round needs; raises ConfigError."""
    from alignkit.stages.reward_model import task_preferences

    n = int(ctx.cfg.pipeline.rounds)
    if n < 1:
        raise ConfigError(f"pipeline.rounds must be >= 1, got {n}")
    selection = str(ctx.cfg.feedback.get("selection", "random"))
    if n == 1:
        if selection != "random" and learned:
            check_selection(ctx)  # one round selects with a model given to it
        return n
    if not learned:
        raise ConfigError(
            f"pipeline.rounds={n} repeats feedback -> reward model -> RL, but no active reward "
            "is learned from feedback (reward= has no learned reward without a path)"
        )
    if task_preferences(ctx):
        raise ConfigError(
            f"pipeline.rounds={n} labels each round's samples, but task.preference_data is a "
            "fixed data set: drop it, or run one round"
        )
    if int(ctx.cfg.rl.steps) < n:
        raise ConfigError(f"pipeline.rounds={n} needs rl.steps >= {n}, got {ctx.cfg.rl.steps}")
    if selection != "random" and trains_rm and ctx.cfg.feedback.max_labels is None:
        raise ConfigError(
            f"feedback.selection={selection} chooses what to label within a budget, but "
            "feedback.max_labels is not set (every prompt would be labelled)"
        )
    if selection != "random" and not trains_rm:
        console.print(
            f"pipeline: feedback.selection={selection} ranks prompts with the last round's "
            "reward model, and this pipeline trains none (its algorithm is not scored): every "
            "round labels prompts in a seeded random order"
        )
    return n


def run_rounds(ctx: RunContext, sft_dir: Path, trains_rm: bool) -> tuple[dict[str, Any], Any]:
    """Every round after SFT; the summary (the last round's keys, totals and per-round keys)
    and the last round's RL context (its policy is the pipeline's)."""
    from alignkit.stages.common import load_model
    from alignkit.stages.evaluate import compare_policies
    from alignkit.stages.pipeline import collect_feedback, train_reward_model
    from alignkit.stages.rl import run_rl

    n = int(ctx.cfg.pipeline.rounds)
    sft_policy, _ = load_model(ctx, sft_dir)
    summary: dict[str, Any] = {}
    policy, previous_rm, offset = sft_dir, None, 0
    labels = {"feedback_labels": 0.0, "rl_final/select_labels": 0.0}
    rl_ctx: Any = None
    for index in range(1, n + 1):
        rctx = round_context(ctx, index, previous_rm, offset)
        round_summary: dict[str, Any] = {}
        if trains_rm:
            # Every round's feedback so far: the extended model keeps the older samples.
            data = [ctx.run_dir / f"round_{i}" / "feedback" for i in range(1, index + 1)]
            rm_summary, artifacts = train_reward_model(rctx, policy, data=data)
            artifacts = dataclasses.replace(artifacts, sft_policy=sft_dir)
            previous_rm = artifacts.reward_model
        else:
            rm_summary, feedback = collect_feedback(rctx, policy)
            artifacts = Artifacts(sft_dir, feedback=feedback)
        round_summary.update(rm_summary)
        rl_summary, rl_ctx = run_rl(rctx, policy, artifacts=artifacts, reference_path=sft_dir)
        round_summary.update(rl_summary)
        rl_ctx.policy.eval()
        eval_ctx = dataclasses.replace(rctx, artifacts=artifacts)
        round_summary.update(
            compare_policies(eval_ctx, rl_ctx.policy, sft_policy, rl_ctx.tokenizer)
        )
        for key in labels:
            labels[key] += float(round_summary.get(key, 0.0))
        spent = sum(labels.values())
        summary.update(round_summary)
        summary.update(_per_round(index, round_summary, spent))
        ctx.tracker.log(
            _per_round(index, round_summary, spent, prefix=""), step=index, stage="round"
        )
        policy = rctx.run_dir / "rl" / "policy"
        offset += int(rctx.cfg.rl.steps)
    # Totals over the rounds, where the last round's own numbers would otherwise stand.
    summary.update(labels)
    summary["labels_total"] = sum(labels.values())
    return summary, rl_ctx


def _per_round(
    index: int, summary: dict[str, Any], labels: float, prefix: str | None = None
) -> dict[str, float]:
    head = f"round_{index}/" if prefix is None else prefix
    out = {f"{head}{k}": float(summary[k]) for k in EVAL_KEYS if k in summary}
    out[f"{head}labels"] = labels
    if "rm_gold_agreement" in summary:
        out[f"{head}rm_gold_agreement"] = float(summary["rm_gold_agreement"])
    return out
