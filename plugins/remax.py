"""``algorithm=remax``: ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient
Reinforcement Learning Method for Aligning Large Language Models").

REINFORCE whose baseline is the reward of the greedy response to the same prompt (Algorithm
1, eq. 5)::

    A_i = r(x, y_i) - r(x, y_greedy(x))

The greedy responses come from the configured rollout engine (``ctx.sample(greedy=True)``)
and are scored by the configured rewards (``ctx.score``), in the rollout, on each rank's own
prompts; the baseline travels with its rows. A KL penalty in the reward (``rl.kl_coef``)
shapes the sampled responses' rewards (:func:`alignkit.rl.sequence_rewards`). The loss is the
registered ``ppo_clip``: on the first pass over a batch (the ratio is 1) its gradient is the
REINFORCE gradient. The paper samples one response per prompt (``rl.samples_per_prompt=1``);
more are allowed, each against the same greedy baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from alignkit import ComponentRegistry, Rollout, RunContext, hookimpl, store_algorithm
from alignkit.rl import PolicyGradientConfig, sequence_rewards

BASELINE = "remax/baseline"
"""``Rollout.extras`` key: (B,) the greedy response's reward, per row."""


@dataclass
class ReMaxConfig(PolicyGradientConfig):
    name: str = "remax"
    advantage_estimator: str | None = "remax"


def remax_advantages(ctx: RunContext, batch: Rollout) -> Tensor:
    """(B,) KL-shaped reward of each sample minus its prompt's greedy reward."""
    return sequence_rewards(ctx, batch) - batch.extras[BASELINE]


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "remax", ReMaxConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("advantage", "remax", remax_advantages)


@hookimpl
def rollout(ctx: RunContext, records: list[Any]) -> Rollout:
    batch = ctx.score(ctx.sample(records))
    greedy = ctx.score(ctx.sample(records, samples_per_prompt=1, greedy=True, reference=False))
    batch.extras[BASELINE] = greedy.rewards.repeat_interleave(batch.group_size)
    return batch


@hookimpl
def step_end(ctx: RunContext, step: int, batch: Rollout, metrics: dict[str, float]) -> None:
    metrics["remax/baseline"] = float(batch.extras[BASELINE].mean())
