"""``algorithm=grpo``: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath").

No critic: each prompt's ``G = rl.samples_per_prompt`` responses form a group, and the
outcome advantage of every token of response i is its reward standardised within the group
(eq. 3 and Sec. 4.1.2)::

    A_i = (r_i - mean(r_1..G)) / (std(r_1..G) + eps)        (std optional: algorithm.scale_rewards)

The objective (eq. 3), maximised, with ``rho = pi / pi_old`` per token::

    J = E[ agg_i,t( min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta * KL_k3(pi || ref) ) ]

The KL to the reference is a term of the loss, not of the reward (k3 estimator, eq. 4;
``beta = rl.kl_coef``, 0 drops it and the reference forward). ``agg`` is the paper's
per-sequence mean of token means (``seq_mean_token_mean``) or a token mean (``token_mean``).

The estimator is registered as ``grpo`` (kind ``advantage``) and the update is the core's
policy-gradient update with the ``ppo_clip`` loss, so a variant (GSPO's sequence ratio, DAPO's
decoupled clip) is a registered loss and a config value. Refused when the run starts:
``rl.samples_per_prompt=1``, where every advantage is 0, and ``rl.kl_estimator=k1``, whose term
in the loss has zero expected gradient (unset, the KL in the loss is k3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from torch import Tensor

from alignkit import AlgorithmNeeds, ComponentRegistry, Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.rl import PolicyGradientConfig, sequence_rewards
from alignkit.rl.ops import group_normalized_advantages


@dataclass
class GRPOConfig(PolicyGradientConfig):
    name: str = "grpo"
    advantage_estimator: str | None = "grpo"
    scale_rewards: bool = True
    """Divide the group-centred rewards by the group std (False: Dr. GRPO's centring only)."""
    loss_agg: str = "seq_mean_token_mean"
    """token_mean | seq_mean_token_mean (the paper) | seq_mean_token_sum_norm."""


def grpo_advantages(ctx: RunContext, batch: Rollout) -> Tensor:
    """(B,) group-standardised rewards (eq. 3); ``algorithm.scale_rewards`` (default True)
    divides by the group std."""
    scale = bool(ctx.cfg.algorithm.get("scale_rewards", True))
    return group_normalized_advantages(sequence_rewards(ctx, batch), batch.group_ids, scale)


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "grpo", GRPOConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("advantage", "grpo", grpo_advantages)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    # The KL to the reference is a term of the loss (eq. 3), not of the reward.
    return AlgorithmNeeds(kl_in="loss", min_group_size=2)
