"""Registered advantage estimators, and the rewards they start from.

An advantage estimator is a function registered under kind ``advantage`` (``registry.add(
"advantage", name, fn)`` in a plugin's ``register_components``) and chosen by
``algorithm.advantage_estimator``::

    fn(ctx, batch) -> (B,) per-sequence or (B, R) per-token advantages

The core's ``advantage`` hook (used when the algorithm does not implement one) calls it
through :func:`estimate_advantages`, which spreads a (B,) result over each row's tokens and
zeroes padding. Estimators read the rewards through :func:`sequence_rewards` (or
:func:`token_rewards`), which apply the KL penalty when the algorithm keeps its KL in the
reward, so an estimator works the same for either placement.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.errors import ConfigError, PluginError
from alignkit.rl.ops import per_token_rewards

AdvantageFn = Callable[[RunContext, Rollout], Tensor]


def kl_coef_in_reward(ctx: RunContext) -> float:
    """``rl.kl_coef`` when the active algorithm's KL is a reward penalty, else 0."""
    return float(ctx.cfg.rl.kl_coef) if ctx.needs.kl_in == "reward" else 0.0


def sequence_rewards(ctx: RunContext, batch: Rollout, kl_coef: float | None = None) -> Tensor:
    """(B,) rewards, minus ``kl_coef * sum_t kl_t`` when the KL is in the reward.

    ``kl_coef`` defaults to :func:`kl_coef_in_reward`; the per-token KL is the rollout's
    (``batch.kl``), 0 without a reference.
    """
    if batch.rewards is None:
        raise PluginError("the batch has no rewards: the reward phase did not run")
    coef = kl_coef_in_reward(ctx) if kl_coef is None else kl_coef
    if batch.kl is None or coef == 0:
        return batch.rewards
    return batch.rewards - coef * batch.kl.sum(1)


def token_rewards(ctx: RunContext, batch: Rollout, kl_coef: float | None = None) -> Tensor:
    """(B, R) per-token rewards: the sequence reward on the last response token and
    ``-kl_coef * kl_t`` on every token (Ziegler et al. 2019, eq. 2), 0 at padding."""
    if batch.rewards is None:
        raise PluginError("the batch has no rewards: the reward phase did not run")
    coef = kl_coef_in_reward(ctx) if kl_coef is None else kl_coef
    kl = batch.kl if batch.kl is not None else torch.zeros_like(batch.response_mask)
    return per_token_rewards(batch.rewards, kl, batch.response_mask, coef)


def estimate_advantages(ctx: RunContext, batch: Rollout) -> Rollout:
    """``batch.advantages`` from the estimator named by ``algorithm.advantage_estimator``."""
    name = ctx.cfg.algorithm.get("advantage_estimator")
    if name is None:
        raise ConfigError("algorithm.advantage_estimator is not set")
    adv = ctx.registry.get("advantage", str(name))(ctx, batch)
    mask = batch.response_mask
    if adv.dim() == 1:
        adv = adv[:, None]
    if adv.shape[0] != batch.num_rows:
        raise PluginError(
            f"advantage estimator {name!r} returned shape {tuple(adv.shape)} for "
            f"{batch.num_rows} rows"
        )
    batch.advantages = (adv * mask).to(mask.dtype)
    return batch
