"""``algorithm=cispo``: Clipped IS-weight Policy Optimization (MiniMax-M1, Chen et al. 2025).

GRPO's group-normalised advantages (the registered ``grpo`` estimator) with a REINFORCE-style
token loss whose importance weight is clipped and detached (eq. 4-5)::

    r_t  = pi(y_t) / pi_old(y_t)
    J    = 1/sum_i |y_i| * sum_i,t sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_i * log pi(y_t)

Unlike PPO's clip, which zeroes the gradient of a token whose ratio left the range (the rare
"fork" tokens a reasoning model needs), the clip here only bounds the token's weight: every
token keeps a gradient. The paper sets no lower bound (``clip_eps=1`` lets the weight fall to
0) and a loose upper one. The loss is registered as ``cispo`` (kind ``policy_loss``).
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
class CISPOConfig(PolicyGradientConfig):
    name: str = "cispo"
    advantage_estimator: str | None = "grpo"
    policy_loss: str = "cispo"
    clip_eps: float = 1.0
    """1 - clip_eps is the weight's lower bound (1: none)."""
    clip_eps_high: float | None = 4.0
    """The weight's upper bound is 1 + clip_eps_high."""
    loss_agg: str = "token_mean"


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float,
) -> tuple[Tensor, Tensor]:
    """(b, R) per-token loss ``-sg(clip(r)) * A * log pi`` (0 at padding) and the fraction of
    tokens whose weight was clipped. All inputs (b, R)."""
    valid = mask != 0
    ratio = torch.exp(torch.where(valid, logp.detach() - old_logp, 0.0))
    weight = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.where(valid, -weight * advantages * logp, 0.0)
    return per_token, masked_mean((weight != ratio).float(), mask)


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "cispo", CISPOConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("policy_loss", "cispo", cispo_loss)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    return AlgorithmNeeds(kl_in="loss", min_group_size=2)
