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

Refused at config time (:mod:`alignkit.validate`): ``rl.samples_per_prompt=1``, where every
advantage is 0, and ``algorithm.kl_estimator=k1``, whose term in the loss has zero expected
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.ops import group_normalized_advantages
from alignkit.training import (
    ClippedPGConfig,
    PolicyLossSpec,
    policy_gradient_update,
    reference_kl,
    rl_step_metrics,
)
from alignkit.validate import require_groups


@dataclass
class GRPOConfig(ClippedPGConfig):
    name: str = "grpo"
    scale_rewards: bool = True
    """Divide the group-centred rewards by the group std (False: Dr. GRPO's centring only)."""
    loss_agg: str = "seq_mean_token_mean"
    """token_mean | seq_mean_token_mean (the paper) | seq_mean_token_sum_norm."""
    kl_estimator: str = "k3"
    """Estimator of the KL term in the loss: k3 (the paper's) or k2 (its gradient is exactly
    that of KL(pi || ref)); k1 is refused, its expected gradient being zero."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "grpo", GRPOConfig)


@hookimpl
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    assert batch.rewards is not None
    # A group of one is its own mean: every advantage would be 0 and nothing would train.
    require_groups("grpo", batch.group_size)
    algo = ctx.cfg.algorithm
    adv = group_normalized_advantages(batch.rewards, batch.group_ids, bool(algo.scale_rewards))
    batch.advantages = adv[:, None] * batch.response_mask
    batch.extras["kl_seq"] = reference_kl(batch, str(algo.kl_estimator)).sum(1)
    return batch


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    algo = ctx.cfg.algorithm
    # No reference log-probs means rl.kl_coef == 0: the KL term is dropped, not faked.
    kl_coef = float(ctx.cfg.rl.kl_coef) if batch.ref_logprobs is not None else 0.0
    spec = PolicyLossSpec.from_algorithm(algo, kl_coef=kl_coef, kl_estimator=str(algo.kl_estimator))
    metrics = policy_gradient_update(
        ctx,
        batch,
        spec,
    )
    return {**metrics, **rl_step_metrics(batch, batch.extras["kl_seq"], kl_coef)}
