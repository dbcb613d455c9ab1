"""``algorithm=dapo``: DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale").

GRPO's group-normalised advantages with the paper's four changes:

* decoupled clip (clip-higher, eq. 10): ``clip(rho, 1 - eps_low, 1 + eps_high)``, 0.2 / 0.28,
  through the registered ``ppo_clip`` loss;
* token-level aggregation (eq. 12): ``loss_agg=token_mean``;
* dynamic sampling (eq. 11): groups whose rewards are all equal (zero advantage) are dropped
  and replaced by groups of fresh prompts from the run's prompt sampler, up to
  ``max_refills`` extra rounds; every rank samples as many rounds (the decision is taken on
  the count summed over ranks), and the batch keeps its size (flat groups fill what is left);
* soft overlong punishment (eq. 13) as its own reward component ``overlong`` (weight 1)::

      R_len(y) = clip(((L_max - L_cache) - |y|) / L_cache, -1, 0)

and no KL term (Sec. 2.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit import AlgorithmNeeds, Rollout, RunContext, hookimpl, store_algorithm
from alignkit.rl import PolicyGradientConfig


@dataclass
class DAPOConfig(PolicyGradientConfig):
    name: str = "dapo"
    advantage_estimator: str | None = "grpo"
    clip_eps: float = 0.2
    clip_eps_high: float | None = 0.28
    loss_agg: str = "token_mean"
    max_refills: int = 3
    """Extra sampling rounds to replace groups whose rewards are all equal."""
    overlong_buffer: int = 4
    """L_cache: tokens before ``rl.max_new_tokens`` over which length is penalised softly."""


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "dapo", DAPOConfig)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    return AlgorithmNeeds(kl_in="none", min_group_size=2, reward_weights={"overlong": 1.0})


@hookimpl
def reward(ctx: RunContext, batch: Rollout) -> dict[str, Tensor]:
    limit, buffer = int(ctx.cfg.rl.max_new_tokens), int(ctx.cfg.algorithm.overlong_buffer)
    length = batch.response_mask.sum(1)
    return {"overlong": ((limit - buffer - length) / buffer).clamp(-1.0, 0.0)}


def informative(batch: Rollout) -> Tensor:
    """(B,) True on the rows of groups whose rewards are not all equal."""
    assert batch.rewards is not None
    rewards = batch.rewards.view(-1, batch.group_size)
    spread = rewards.max(1).values > rewards.min(1).values
    return spread.repeat_interleave(batch.group_size)


@hookimpl
def rollout(ctx: RunContext, records: list[Any]) -> Rollout:
    batch = ctx.score(ctx.sample(records))
    rows, keep = batch.num_rows, informative(batch)
    kept, flat = [batch.select(keep)], [batch.select(~keep)]
    for _ in range(int(ctx.cfg.algorithm.max_refills)):
        missing = rows - sum(b.num_rows for b in kept)
        if ctx.sum_over_ranks(max(missing, 0)) == 0:  # the same decision on every rank
            break
        more = ctx.score(ctx.sample(ctx.draw_prompts(len(records) * ctx.backend.world_size)))
        keep = informative(more)
        kept.append(more.select(keep))
        flat.append(more.select(~keep))
    merged = Rollout.cat([*kept, *flat], int(ctx.tokenizer.pad_token_id or 0))
    out = merged.select(torch.arange(rows))
    # Summed over ranks: the same global fraction on every rank.
    kept_rows = ctx.sum_over_ranks(sum(b.num_rows for b in kept))
    out.extras["dapo/informative"] = kept_rows / ctx.sum_over_ranks(rows)
    return out


@hookimpl
def step_end(ctx: RunContext, step: int, batch: Rollout, metrics: dict[str, float]) -> None:
    metrics["dapo/informative_fraction"] = min(float(batch.extras["dapo/informative"]), 1.0)
