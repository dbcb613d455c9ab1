"""``stage=eval``: compare a policy with a baseline on held-out prompts.

Both policies are sampled on the same prompts (the i-th sample of one paired with the i-th of
the other), then every available evaluator judges the pairs:

* the task's gold oracle (``task.gold_score``; the built-in task has one, user data does not):
  ``gold_score_sft``, ``gold_score_policy``, ``gold_win_rate``;
* a reward model (``eval.reward_model``, else the run's own learned reward):
  ``rm_score_policy``, ``rm_score_baseline``, ``rm_win_rate``;
* a pairwise LLM judge (``eval.judge``): ``judge_win_rate`` (mean ``P(policy better)``),
  ``judge_win_rate_hard`` (pairs won, ties one half) and ``judge_failures``.

``win_rate`` repeats the most trustworthy of them: the gold one when the task has an oracle,
else the judge's, else the reward model's (which RL optimised, so it is optimistic), and
``win_rate_source`` names which (``gold``, ``judge``, ``reward_model``).
``length_policy`` / ``length_baseline`` (mean response tokens) and ``kl_to_baseline`` (also
under its historical name ``kl_to_sft``) come with every evaluation. See docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.data.chat import Conversation
from alignkit.data.prompts import conversation, prompt_format, template_mode
from alignkit.errors import ConfigError
from alignkit.evaluation import (
    Samples,
    gold_scores,
    judge_win_rates,
    mean_length,
    sample_policy,
    sample_table,
    sequence_kl,
    win_rate,
)
from alignkit.judges import CritiqueJudge, JudgeError, load_template
from alignkit.judges.config import build_backend
from alignkit.progress import sample_with_progress
from alignkit.rewards.learned import (
    EnsembleScorer,
    Scorer,
    load_scorer,
    member_folders,
    scorer_for,
)
from alignkit.stages.common import load_model
from alignkit.tracking import console

__all__ = ["Evaluators", "build_evaluators", "compare_policies", "has_gold", "run_eval"]

JUDGE_BACKENDS = ("none", "local", "http")
ON_ERROR = ("raise", "fallback")


# --------------------------------------------------------------------------------------------
# what judges the pairs
# --------------------------------------------------------------------------------------------


@dataclass
class Evaluators:
    """The evaluators of one comparison; at least one of the three is present."""

    gold: bool
    """The task has a gold oracle."""
    scorer: Scorer | None = None
    """The reward model scoring (prompt, response) texts."""
    scorer_source: str = ""
    """Where the reward model came from, e.g. ``eval.reward_model=<folder>``."""
    judge: CritiqueJudge | None = None
    """The pairwise judge (``eval.judge``)."""
    both_orders: bool = True

    def close(self) -> None:
        """Release the judge's connections or model."""
        if self.judge is not None:
            self.judge.close()
            self.judge = None


def has_gold(task: Any) -> bool:
    """Whether ``task`` has a gold oracle: a callable ``gold_score`` and no ``has_gold=False``."""
    return callable(getattr(task, "gold_score", None)) and bool(getattr(task, "has_gold", True))


def build_evaluators(ctx: RunContext) -> Evaluators:
    """Resolve (and load) the gold oracle, reward model and judge the config makes available.

    Called before any sampling, so a missing reward model, a misconfigured judge or an
    evaluation with nothing to judge by fails at once with a :class:`ConfigError`.
    """
    ecfg = ctx.cfg.eval
    scorer, source = _reward_scorer(ctx)
    ev = Evaluators(gold=has_gold(ctx.task), scorer=scorer, scorer_source=source)
    ev.judge = _build_judge(ecfg.judge, ctx.device)
    ev.both_orders = bool(ecfg.judge.both_orders)
    if not ev.gold and ev.scorer is None and ev.judge is None:
        raise ConfigError(
            "eval: nothing to judge the policies by: the task has no gold oracle (gold_score), "
            "no reward model is available and no judge is configured; set eval.reward_model="
            "<reward-model folder> (or reward.<name>.path), or eval.judge.backend=http with "
            "eval.judge.url=<OpenAI-compatible base URL> (or backend=local with eval.judge.path)"
        )
    return ev


def _reward_scorer(ctx: RunContext) -> tuple[Scorer | None, str]:
    """``eval.reward_model``, else the first active ``reward.<name>`` with a model folder,
    else the first learned reward, scored by the reward model this pipeline trained
    (``ctx.artifacts.reward_model``)."""
    ecfg = ctx.cfg.eval
    if ecfg.reward_model:
        members = [
            load_scorer(
                folder,
                device=ctx.device,
                batch_size=int(ecfg.batch_size),
                key="eval.reward_model",
                template=template_mode(ctx.cfg),
            )
            for folder in member_folders(str(ecfg.reward_model))
        ]
        # A folder of member_<i> folders is an ensemble: its members' mean scores the pairs.
        scorer: Scorer = members[0] if len(members) == 1 else EnsembleScorer(members)
        return scorer, f"eval.reward_model={ecfg.reward_model}"
    rewards = ctx.cfg.get("reward") or {}
    for name, node in rewards.items():
        if node is not None and (node.get("path") or node.get("paths")):
            return scorer_for(ctx, str(name)), f"reward.{name}"
    trained = ctx.artifacts.reward_model
    learned = [str(n) for n in rewards if str(n) in ctx.registry.names("learned_reward")]
    if trained is not None and learned:
        return scorer_for(ctx, learned[0]), f"reward.{learned[0]} (trained: {trained})"
    return None, ""


def _build_judge(node: Any, device: str | torch.device) -> CritiqueJudge | None:
    """The pairwise judge of ``eval.judge``; None for ``backend=none``."""
    backend = str(node.backend)
    if backend not in JUDGE_BACKENDS:
        raise ConfigError(
            f"eval.judge.backend={backend!r}; expected one of {', '.join(JUDGE_BACKENDS)}"
        )
    if backend == "none":
        return None
    if backend == "local" and not node.path:
        raise ConfigError(
            "eval.judge.path is not set: the judge model folder for eval.judge.backend=local "
            "(alignkit stage=judge writes <run_dir>/judge)"
        )
    if backend == "http" and not node.url:
        raise ConfigError(
            "eval.judge.url is not set: the base URL of an OpenAI-compatible server for "
            "eval.judge.backend=http, e.g. http://127.0.0.1:8000/v1"
        )
    on_error = str(node.on_error)
    if on_error not in ON_ERROR:
        raise ConfigError(f"eval.judge.on_error={on_error!r}; expected one of raise, fallback")
    if on_error == "fallback" and (
        node.fallback_value is None or not 0.0 <= float(node.fallback_value) <= 1.0
    ):
        raise ConfigError(
            "eval.judge.on_error=fallback needs eval.judge.fallback_value in [0, 1]: the "
            "probability a failed verdict gives response A (0.5 counts it as a tie)"
        )
    template = load_template(str(node.template))
    try:
        model = build_backend(node, device, system=template.system)
    except ConfigError as exc:
        # The backends name their keys ``judge.<key>``; here they live under ``eval.``.
        message = str(exc)
        raise ConfigError(f"eval.{message}" if message.startswith("judge") else message) from None
    return CritiqueJudge(
        model,
        template,
        per_principle=False,
        on_error=on_error,
        fallback_value=node.fallback_value,
    )


# --------------------------------------------------------------------------------------------
# the texts evaluators read
# --------------------------------------------------------------------------------------------


def _prompt_texts(ctx: RunContext, records: Sequence[Any]) -> list[str]:
    """The prompt as text for the judge's template (a readable ``User: ...`` rendering for
    conversations), and for a reward model when a record has no conversation."""
    return [ctx.task.format_prompt(r) for r in records]


def _rm_scores(
    scorer: Scorer,
    prompts: Sequence[str],
    responses: Sequence[str],
    conversations: Sequence[Conversation] | None = None,
    finished: Sequence[bool] | None = None,
) -> list[float]:
    """(B,) reward-model scores; each conversation is re-rendered in the reward model's own
    format (its tokenizer and chat template), and a response cut at the length limit
    (``finished`` False) is scored unterminated, as in RL."""
    convs = None if conversations is None else list(conversations)
    scores = scorer.score(list(prompts), list(responses), convs, finished)
    return [float(v) for v in scores.tolist()]


def _judge_probs(
    ev: Evaluators, prompts: Sequence[str], policy: Sequence[str], baseline: Sequence[str]
) -> list[float]:
    """``P(policy response better)`` per pair; both orders averaged when configured."""
    assert ev.judge is not None
    try:
        pairs = ev.judge.compare(prompts, policy, baseline, both_orders=ev.both_orders)
    except JudgeError as exc:
        raise JudgeError(
            f"eval.judge: {exc} (with eval.judge.on_error=fallback and "
            "eval.judge.fallback_value=0.5 a failed verdict counts as a tie instead)"
        ) from None
    return [p.prob_a for p in pairs]


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------


def compare_policies(
    ctx: RunContext,
    policy: Any,
    baseline: Any,
    tokenizer: Any,
    evaluators: Evaluators | None = None,
) -> dict[str, Any]:
    """Win-rates of ``policy`` over ``baseline`` by every available evaluator, length and KL.

    Each held-out prompt is sampled ``eval.samples_per_prompt`` times per policy (the i-th
    sample of one against the i-th of the other), which narrows the win-rate's sampling noise
    without more prompts. ``evaluators`` (from :func:`build_evaluators`) are built here when
    not given, and closed at the end either way.

    Returns the summary described in the module docstring: floats, plus ``win_rate_source``.
    """
    ecfg = ctx.cfg.eval
    k = int(ecfg.samples_per_prompt)
    if k < 1:
        raise ConfigError(f"eval.samples_per_prompt must be >= 1, got {k}")
    ev = evaluators if evaluators is not None else build_evaluators(ctx)
    try:
        prompts = ctx.task.eval_prompts()[: int(ecfg.num_prompts)]
        records = [r for _ in range(k) for r in prompts]
        pol = _sample(ctx, policy, tokenizer, records, seed_offset=11)
        base = _sample(ctx, baseline, tokenizer, records, seed_offset=12, label="baseline")
        summary = _judge_samples(ctx, ev, records, pol, base)
    finally:
        ev.close()
    kl = sequence_kl(policy, baseline, pol, temperature=float(ecfg.temperature))
    summary.update(
        {
            "length_policy": mean_length(pol.response_mask),
            "length_baseline": mean_length(base.response_mask),
            "kl_to_baseline": kl,
            "kl_to_sft": kl,
            "eval_prompts": float(len(prompts)),
            "eval_samples": float(len(records)),
        }
    )
    return summary


def _sample(
    ctx: RunContext,
    model: Any,
    tokenizer: Any,
    records: list[Any],
    *,
    seed_offset: int,
    label: str = "policy",
) -> Samples:
    ecfg = ctx.cfg.eval
    gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + seed_offset)
    fmt = prompt_format(ctx.cfg, tokenizer, model)

    def sample(part: Sequence[Any]) -> Samples:
        return sample_policy(
            model,
            tokenizer,
            ctx.task,
            part,
            max_new_tokens=int(ecfg.max_new_tokens),
            temperature=float(ecfg.temperature),
            greedy=bool(ecfg.greedy),
            batch_size=int(ecfg.batch_size),
            max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
            generator=gen,
            fmt=fmt,
        )

    # In slices of whole batches, so progress shows (same samples as one call).
    return sample_with_progress(  # type: ignore[no-any-return]
        f"eval sampling ({label})",
        records,
        int(ecfg.batch_size),
        int(tokenizer.pad_token_id),
        sample,
    )


def _judge_samples(
    ctx: RunContext, ev: Evaluators, records: list[Any], pol: Samples, base: Samples
) -> dict[str, Any]:
    """Gold, reward-model and judge numbers of the paired samples; logs the sample table."""
    summary: dict[str, Any] = {}
    scores: dict[str, dict[str, list[float]]] = {"baseline": {}, "policy": {}}
    pair_scores: dict[str, list[float]] = {}
    rates: dict[str, float] = {}
    if ev.gold:
        g_pol = gold_scores(ctx.task, records, pol.responses)
        g_base = gold_scores(ctx.task, records, base.responses)
        scores["baseline"]["gold"], scores["policy"]["gold"] = g_base, g_pol
        rates["gold"] = win_rate(g_pol, g_base)
        summary["gold_score_sft"] = sum(g_base) / len(g_base)
        summary["gold_score_policy"] = sum(g_pol) / len(g_pol)
        summary["gold_win_rate"] = rates["gold"]
    texts = _prompt_texts(ctx, records) if ev.scorer or ev.judge else []
    if ev.scorer is not None:
        raw = template_mode(ctx.cfg) == "raw"
        convs = [conversation(ctx.task, r, raw) for r in records]
        r_pol = _rm_scores(ev.scorer, texts, pol.responses, convs, pol.finished)
        r_base = _rm_scores(ev.scorer, texts, base.responses, convs, base.finished)
        scores["baseline"]["rm"], scores["policy"]["rm"] = r_base, r_pol
        rates["reward_model"] = win_rate(r_pol, r_base)
        summary["rm_score_policy"] = sum(r_pol) / len(r_pol)
        summary["rm_score_baseline"] = sum(r_base) / len(r_base)
        summary["rm_win_rate"] = rates["reward_model"]
    if ev.judge is not None:
        probs = _judge_probs(ev, texts, pol.responses, base.responses)
        pair_scores["judge P(policy)"] = probs
        rates["judge"], summary["judge_win_rate_hard"] = judge_win_rates(probs)
        summary["judge_win_rate"] = rates["judge"]
        summary["judge_failures"] = float(ev.judge.failures)
    source = next(s for s in ("gold", "judge", "reward_model") if s in rates)
    summary["win_rate"], summary["win_rate_source"] = rates[source], source
    _announce(ev, source)
    header, rows = sample_table(
        records,
        {"baseline": base.responses, "policy": pol.responses},
        scores,
        int(ctx.cfg.eval.samples_to_show),
        pair_scores,
    )
    ctx.tracker.log_table("eval_samples", header, rows)
    return summary


def _announce(ev: Evaluators, source: str) -> None:
    """Say on the console which evaluator ``win_rate`` is, and where the reward model is from."""
    if ev.scorer is not None:
        note = "" if ev.scorer_source.startswith("eval.") else " (optimistic if RL optimised it)"
        console.print(f"eval: reward model from {ev.scorer_source}{note}")
    console.print(f"eval: win_rate is the {source.replace('_', ' ')} win-rate")


def run_eval(ctx: RunContext) -> dict[str, Any]:
    """``eval.policy`` vs ``eval.baseline`` (both HF folders)."""
    ecfg = ctx.cfg.eval
    if not ecfg.policy or not ecfg.baseline:
        raise ConfigError("stage=eval needs eval.policy and eval.baseline (two policy folders)")
    evaluators = build_evaluators(ctx)
    try:
        policy, tokenizer = load_model(ctx, Path(ecfg.policy))
        baseline, _ = load_model(ctx, Path(ecfg.baseline))
    except BaseException:
        evaluators.close()
        raise
    return compare_policies(ctx, policy, baseline, tokenizer, evaluators)
