"""Choose the RL run's final policy by held-out human labels, not by the training reward.

A learned reward keeps rising while the policy over-optimises it (Gao et al. 2023, "Scaling
Laws for Reward Model Overoptimization"): under noisy, scarce labels the last policy is often
worse than the one RL started from. With ``rl.select_every=N`` the run keeps the policy's
weights every N steps (and the start), and after training the feedback annotator
(``feedback.annotator``: the simulated human with its noise, or any other) compares one
sample of each kept policy against one of the start policy on ``rl.select_prompts`` prompts
drawn from the training split. The kept policy with the highest win-rate over the start
becomes the final one; the start itself counts as 0.5, so a run whose every later policy loses
ends where it began. The gold oracle is never used. Each comparison is a label, counted in
``select_labels`` next to the feedback stage's ``feedback_labels``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.data.prompts import prompt_format
from alignkit.errors import ConfigError
from alignkit.evaluation import sample_policy
from alignkit.tracking import console

__all__ = ["Snapshots", "choose", "select_policy"]


@dataclass
class Snapshots:
    """The policy's trainable weights every ``every`` steps (CPU copies), keyed by step."""

    every: int
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def take(self, step: int, policy: torch.nn.Module) -> None:
        """Keep ``policy``'s weights as they are after ``step`` steps."""
        self.weights[step] = {
            name: p.detach().to("cpu", copy=True)
            for name, p in policy.named_parameters()
            if p.requires_grad
        }

    def after_step(self, done: int, policy: torch.nn.Module, last: bool) -> None:
        """The engine's per-step callback: keep every ``every``-th policy and the last."""
        if done % self.every == 0 or last:
            self.take(done, policy)


def _load(policy: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))


def _samples(ctx: RunContext, records: Sequence[Any], seed: int) -> list[str]:
    assert ctx.policy is not None
    fcfg, rl = ctx.cfg.feedback, ctx.cfg.rl
    return sample_policy(
        ctx.policy,
        ctx.tokenizer,
        ctx.task,
        records,
        max_new_tokens=int(rl.max_new_tokens),
        temperature=1.0,
        batch_size=int(fcfg.batch_size),
        max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
        generator=torch.Generator().manual_seed(seed),
        fmt=prompt_format(ctx.cfg, ctx.tokenizer, ctx.policy),
    ).responses


def choose(win_rates: dict[int, float]) -> int:
    """The step with the highest win-rate over the start (the start is 0.5); the earlier step
    on a tie: as good by the annotator, and nearer the start, so less drifted into what a
    noisy reward model gets wrong (the win-rates are estimates, and the largest of several
    is biased upwards)."""
    return max(win_rates, key=lambda step: (win_rates[step], -step))


def select_policy(ctx: RunContext, snapshots: Snapshots, annotator: Any) -> dict[str, float]:
    """Load the kept policy the annotator prefers most over the start into ``ctx.policy``;
    returns ``select/step``, ``select/win_rate``, ``select/win_rate_<step>`` and
    ``select_labels``."""
    if not callable(getattr(annotator, "compare", None)):
        raise ConfigError(
            f"rl.select_every needs an annotator that compares two responses; "
            f"feedback.annotator={ctx.cfg.feedback.annotator} does not"
        )
    prompts = ctx.task.train_prompts()
    n = min(int(ctx.cfg.rl.select_prompts), len(prompts))
    records = random.Random(int(ctx.cfg.seed) + 17).sample(prompts, n)
    seed = int(ctx.cfg.seed) * 1_000_003 + 5
    _load(ctx.policy, snapshots.weights[0])
    base = _samples(ctx, records, seed)
    win_rates: dict[int, float] = {0: 0.5}
    labels = 0
    for step in sorted(s for s in snapshots.weights if s > 0):
        _load(ctx.policy, snapshots.weights[step])
        ours = _samples(ctx, records, seed)
        wins = 0.0
        for record, a, b in zip(records, ours, base, strict=True):
            if a == b:
                wins += 0.5  # the same text: nothing to ask
            else:
                wins += float(annotator.compare(record, a, b) == 0)
                labels += 1
        win_rates[step] = wins / n
    best = choose(win_rates)
    _load(ctx.policy, snapshots.weights[best])
    ctx.policy.train()
    console.print(
        "rl.select: win-rate over the start by the annotator, per kept step: "
        + ", ".join(f"{s}: {w:.3f}" for s, w in sorted(win_rates.items()))
        + f"; the final policy is step {best}'s"
    )
    out = {f"select/win_rate_{s}": w for s, w in win_rates.items()}
    out.update({"select/step": float(best), "select/win_rate": win_rates[best]})
    return {**out, "select_labels": float(labels)}
