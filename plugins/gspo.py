"""``algorithm=gspo``: Group Sequence Policy Optimization (Zheng et al. 2025, "Group Sequence
Policy Optimization").

GRPO's group-normalised advantages (the registered ``grpo`` estimator) with a sequence-level
importance ratio: the length-normalised likelihood ratio of the whole response (eq. 7),
clipped per sequence (eq. 5)::

    s_i = exp( 1/|y_i| sum_t log(pi(y_i,t) / pi_old(y_i,t)) )
    J   = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

The clip range is far narrower than a token ratio's (the paper's 3e-4 / 4e-4): a sequence
ratio is a geometric mean, close to 1. Every token of row i carries the row's term, so the
``seq_mean_token_mean`` aggregation is the mean over sequences of eq. 5; the gradient of
``s_i`` is ``s_i / |y_i| * sum_t grad log pi(y_i,t)``, each token weighted alike. The loss is
registered as ``gspo`` (kind ``policy_loss``): any policy-gradient algorithm may select it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit import AlgorithmNeeds, ComponentRegistry, hookimpl, store_algorithm
from alignkit.rl import PolicyGradientConfig
from alignkit.rl.ops import masked_mean


@dataclass
class GSPOConfig(PolicyGradientConfig):
    name: str = "gspo"
    advantage_estimator: str | None = "grpo"
    policy_loss: str = "gspo"
    clip_eps: float = 3e-4
    clip_eps_high: float | None = 4e-4
    loss_agg: str = "seq_mean_token_mean"


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float,
) -> tuple[Tensor, Tensor]:
    """(b, R) per-token loss (each row's sequence term, eq. 5) and the clipped fraction.

    ``logp``/``old_logp``/``advantages``/``mask``: (b, R); the advantage is read as the
    row's token mean (GRPO's is the same on every token).
    """
    seq_log_ratio = masked_mean(logp - old_logp, mask, dim=1)  # (b,) log s_i
    ratio = torch.exp(seq_log_ratio)[:, None]
    adv = masked_mean(advantages, mask, dim=1)[:, None]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped).expand_as(logp) * mask
    return per_token, masked_mean((clipped > unclipped).float().expand_as(logp), mask)


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "gspo", GSPOConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("policy_loss", "gspo", gspo_loss)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    # GRPO's group baseline and KL-in-the-loss (k3 unless rl.kl_estimator says otherwise).
    return AlgorithmNeeds(kl_in="loss", min_group_size=2)
