"""``stage=pipeline`` (the default): the three stages of RLHF end to end in one run directory.

1. SFT on demonstrations -> ``<run_dir>/sft`` (or ``pipeline.sft_policy``, a policy already
   trained, with no SFT stage);
2. when a learned reward is configured (a ``reward=`` plugin that trains a reward model):
   feedback from the annotator on the SFT policy's samples -> ``<run_dir>/feedback``, then a
   reward model trained on it -> ``<run_dir>/reward_model``, handed to the RL run as its
   :class:`~alignkit.needs.Artifacts` (never written into the config), which scores the RL rollouts
   (with ``task=data`` and ``task.preference_data`` the reward model trains on that data
   directly, with no feedback stage). An algorithm that is not scored (offline DPO) gets
   the feedback itself, and no reward model is trained unless the evaluation needs one;
3. RL from the SFT policy -> ``<run_dir>/rl/policy``;
4. evaluation of the RL policy against the SFT policy on held-out prompts: gold oracle,
   reward model and LLM judge, whichever are available (``docs/evaluation.md``).

With ``pipeline.rounds=N`` steps 2-4 repeat N times, each round from the last one's policy
and reward model (:mod:`alignkit.stages.rounds`).

The whole pipeline holds the run directory's lock (``alignkit.engine.run_lock``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import open_dict

from alignkit.context import RunContext
from alignkit.engine.run_lock import run_guard
from alignkit.errors import ConfigError
from alignkit.needs import Artifacts
from alignkit.stages.common import load_model
from alignkit.stages.evaluate import compare_policies
from alignkit.stages.rl import run_rl
from alignkit.stages.rounds import check_rounds, run_rounds
from alignkit.stages.sft import run_sft
from alignkit.tracking import console


def learned_rewards(ctx: RunContext) -> list[str]:
    """Active reward plugins scored by a reward model that this run has to train: those
    registered as ``learned_reward`` components with no model path configured."""
    trainable = set(ctx.registry.names("learned_reward"))
    return [
        str(name)
        for name, node in (ctx.cfg.get("reward") or {}).items()
        if str(name) in trainable and not _has_model(node)
    ]


def _has_model(node: object) -> bool:
    return bool(getattr(node, "path", None) or getattr(node, "paths", None))


def train_reward_model(
    ctx: RunContext, policy: Path, data: list[Path] | None = None
) -> tuple[dict[str, float], Artifacts]:
    """Feedback on ``policy``'s samples and a reward model trained on it (or on ``data``, the
    feedback folders to train on, this one among them); the summary and the artifacts the RL
    run receives (the learned rewards score with this reward model, and a critic may start
    from it)."""
    from alignkit.stages.feedback import run_feedback
    from alignkit.stages.reward_model import run_reward_model, task_preferences

    feedback = None
    if task_preferences(ctx):  # the task's own preference data: no feedback stage
        summary = dict(run_reward_model(ctx, backbone=policy))
    else:
        summary = dict(run_feedback(ctx, policy_path=policy))
        feedback = ctx.run_dir / "feedback"
        summary.update(run_reward_model(ctx, data=data or [feedback], backbone=policy))
    artifacts = Artifacts(policy, feedback, ctx.run_dir / "reward_model")
    return summary, artifacts


def needs_reward_model(ctx: RunContext) -> bool:
    """Whether the pipeline trains a reward model: the RL algorithm is scored
    (``AlgorithmNeeds.reward``), or the evaluation has no other judge (no gold oracle, no
    judge, no ``eval.reward_model``). An offline algorithm (DPO) otherwise trains on the
    feedback itself."""
    if ctx.needs.reward:
        return True
    judged = str(ctx.cfg.eval.judge.backend) != "none" or bool(ctx.cfg.eval.reward_model)
    return not (hasattr(ctx.task, "gold_score") or judged)


def collect_feedback(ctx: RunContext, policy: Path) -> tuple[dict[str, float], Path | None]:
    """The feedback stage alone, on ``policy``'s samples: its summary and folder (none when
    the task has its own preference data: an offline algorithm reads that instead)."""
    from alignkit.stages.feedback import run_feedback
    from alignkit.stages.reward_model import task_preferences

    if task_preferences(ctx):
        return {}, None
    return dict(run_feedback(ctx, policy_path=policy)), ctx.run_dir / "feedback"


def check_evaluable(ctx: RunContext, learned: list[str]) -> None:
    """Fail before training when the final evaluation would have nothing to judge by: no gold
    oracle, no reward model (trained here, given, or ``eval.reward_model``) and no judge."""
    if hasattr(ctx.task, "gold_score") or learned or ctx.cfg.eval.reward_model:
        return
    if str(ctx.cfg.eval.judge.backend) != "none":
        return
    if any(_has_model(node) for node in (ctx.cfg.get("reward") or {}).values()):
        return
    raise ConfigError(
        f"the pipeline's evaluation would have nothing to judge the RL policy by: "
        f"task={ctx.cfg.task.name} has no gold oracle, no learned reward model is trained or "
        "given, and no judge is configured; set eval.judge.backend=http with eval.judge.url "
        "(or backend=local with eval.judge.path), or eval.reward_model=<folder>"
    )


def check_sft_policy(folder: Path) -> Path:
    """``pipeline.sft_policy``: a model folder with a ``config.json``; raises ConfigError."""
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"pipeline.sft_policy={folder}: not a model folder (no config.json); give the "
            "folder of an SFT policy saved with save_pretrained, e.g. an earlier run's sft/"
        )
    return folder


def with_selection(ctx: RunContext) -> RunContext:
    """``ctx`` with ``rl.select_every`` set from ``pipeline.select_every`` when the config
    leaves it 0 and the feedback annotator compares responses (people in the app do not)."""
    every = int(ctx.cfg.pipeline.get("select_every", 0))
    if int(ctx.cfg.rl.get("select_every", 0)) > 0 or every <= 0:
        return ctx
    from alignkit.stages.feedback import build_annotator

    if not callable(getattr(build_annotator(ctx), "compare", None)):
        console.print(
            f"pipeline: feedback.annotator={ctx.cfg.feedback.annotator} gives no pairwise "
            "comparisons, so the final policy is not chosen (pipeline.select_every)"
        )
        return ctx
    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        cfg.rl.select_every = every
    return dataclasses.replace(ctx, cfg=cfg)


def run_pipeline(ctx: RunContext) -> dict[str, Any]:
    """Every stage in one run directory; the summary holds numbers and ``win_rate_source``."""
    with run_guard(ctx):
        return _run_stages(ctx)


def _run_stages(ctx: RunContext) -> dict[str, Any]:
    from alignkit.stages.reward_model import task_preferences

    summary: dict[str, Any] = {}
    learned = learned_rewards(ctx)
    check_evaluable(ctx, learned)
    rounds = check_rounds(ctx, learned, bool(learned) and needs_reward_model(ctx))
    if learned and not task_preferences(ctx):  # chosen by the annotator of the feedback
        ctx = with_selection(ctx)
    given = ctx.cfg.pipeline.get("sft_policy")
    if given:
        sft_dir = check_sft_policy(Path(str(given)))
    else:
        summary.update(run_sft(ctx))
        sft_dir = ctx.run_dir / "sft"
    if rounds > 1:  # each round evaluates its own policy; the last one's is the pipeline's
        rounds_summary, _ = run_rounds(ctx, sft_dir, needs_reward_model(ctx))
        return {**summary, **rounds_summary}
    artifacts = Artifacts(sft_policy=sft_dir)
    if learned_rewards(ctx) and needs_reward_model(ctx):
        rm_summary, artifacts = train_reward_model(ctx, sft_dir)
        summary.update(rm_summary)
    elif learned_rewards(ctx):
        fb_summary, feedback = collect_feedback(ctx, sft_dir)
        summary.update(fb_summary)
        artifacts = Artifacts(sft_dir, feedback=feedback)
    rl_summary, rl_ctx = run_rl(ctx, sft_dir, artifacts=artifacts)
    summary.update(rl_summary)
    sft_policy, _ = load_model(ctx, sft_dir)
    rl_ctx.policy.eval()
    # The evaluation scores with the reward model this pipeline trained, like the RL run.
    eval_ctx = dataclasses.replace(ctx, artifacts=artifacts)
    summary.update(compare_policies(eval_ctx, rl_ctx.policy, sft_policy, rl_ctx.tokenizer))
    return summary
