"""``algorithm=dr_grpo``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), a
named preset of GRPO's settings.

The paper removes GRPO's two normalisations that bias the optimisation (Sec. 3.1): the
division of the group-centred rewards by the group std (``scale_rewards=false``), and the
division of each response's loss by its own length, replaced by a constant, the generation
budget (``loss_agg=seq_mean_token_sum_norm``, eq. 4's ``1 / max_len``)::

    A_i = r_i - mean(r_1..G)
    J   = 1/G sum_i 1/L_max sum_t min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)

Everything else is GRPO's (the ``grpo`` estimator, the ``ppo_clip`` loss, the KL in the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignkit import AlgorithmNeeds, hookimpl, store_algorithm
from alignkit.rl import PolicyGradientConfig


@dataclass
class DrGRPOConfig(PolicyGradientConfig):
    name: str = "dr_grpo"
    advantage_estimator: str | None = "grpo"
    scale_rewards: bool = False
    loss_agg: str = "seq_mean_token_sum_norm"


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "dr_grpo", DrGRPOConfig)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    return AlgorithmNeeds(kl_in="loss", min_group_size=2)
