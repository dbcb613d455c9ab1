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
from torch import Tensor

from alignkit import ComponentRegistry, Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.rl import PolicyGradientConfig, token_rewards
from alignkit.rl.ops import returns_to_go, whiten_advantages


@dataclass
class ReinforcePPConfig(PolicyGradientConfig):
    name: str = "reinforce_pp"
    advantage_estimator: str | None = "reinforce_pp"
    gamma: float = 1.0
    """Discount of the return-to-go."""
    loss_agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm."""


def reinforce_pp_advantages(ctx: RunContext, batch: Rollout) -> Tensor:
    """(B, R) returns-to-go of the KL-shaped per-token rewards, whitened over the batch."""
    mask = batch.response_mask
    returns = returns_to_go(token_rewards(ctx, batch), mask, float(ctx.cfg.algorithm.gamma))
    # Global (batch) whitening, not per group: the baseline that replaces the critic.
    return whiten_advantages(returns, mask)


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "reinforce_pp", ReinforcePPConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("advantage", "reinforce_pp", reinforce_pp_advantages)
