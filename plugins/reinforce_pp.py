"""``algorithm=reinforce_pp``: REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient
Approach for Aligning Large Language Models").

No critic and no per-prompt groups. The KL to the reference is a per-token penalty in the
reward, the sequence score lands on the last response token, and each token's advantage is
its return-to-go (gamma = 1 by default), whitened over every valid token of the batch::

    r_t = [t == last] * r(x, y) - beta * KL_t(pi || ref)        (KL_t: rl.kl_estimator)
    G_t = sum_{s >= t} gamma^(s-t) r_s
    A_t = (G_t - mean_batch(G)) / std_batch(G)

The loss is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) on these advantages::

    L = agg( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ),   rho = pi / pi_old
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.ops import per_token_rewards, returns_to_go, whiten_advantages
from alignkit.training import (
    ClippedPGConfig,
    kl_in_reward_update,
    reference_kl,
)


@dataclass
class ReinforcePPConfig(ClippedPGConfig):
    name: str = "reinforce_pp"
    gamma: float = 1.0
    """Discount of the return-to-go."""
    loss_agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "reinforce_pp", ReinforcePPConfig)


@hookimpl
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    assert batch.rewards is not None
    rl, mask = ctx.cfg.rl, batch.response_mask
    kl = reference_kl(batch, str(rl.kl_estimator))
    rewards = per_token_rewards(batch.rewards, kl, mask, float(rl.kl_coef))
    returns = returns_to_go(rewards, mask, float(ctx.cfg.algorithm.gamma))
    # Global (batch) whitening, not per group: the baseline that replaces the critic.
    batch.advantages = whiten_advantages(returns, mask)
    batch.extras["kl_seq"] = kl.sum(1)
    return batch


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    return kl_in_reward_update(ctx, batch)
