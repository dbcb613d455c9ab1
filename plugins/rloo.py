"""``algorithm=rloo``: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics").

Each prompt gets ``k = rl.samples_per_prompt`` responses. The whole response is one action:
its reward is the sequence score minus the KL to the reference, summed over its tokens (k1),
and its baseline is the mean shaped reward of the *other* k - 1 responses (eq. 7)::

    s_i = r_i - beta * sum_t (log pi(y_i,t) - log ref(y_i,t))
    A_i = s_i - 1/(k-1) * sum_{j != i} s_j

Every token of response i gets ``A_i``. The loss is REINFORCE's ``-A_i log pi(y_i)``, written
with the ratio ``rho = pi / pi_old`` and PPO's clip so that further passes over the batch
(``epochs > 1``, or later minibatches) stay close to the sampling policy::

    L = agg( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) )

On the first minibatch ``rho = 1`` and the gradient is exactly the REINFORCE gradient.
``rl.samples_per_prompt=1`` (no other sample to leave out) is refused when the run starts.
The estimator is registered as ``rloo``; the update is the core's policy-gradient update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from torch import Tensor

from alignkit import AlgorithmNeeds, ComponentRegistry, Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.rl import PolicyGradientConfig, sequence_rewards
from alignkit.rl.ops import leave_one_out_baseline


@dataclass
class RLOOConfig(PolicyGradientConfig):
    name: str = "rloo"
    advantage_estimator: str | None = "rloo"
    loss_agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (the paper's sequence-level
    objective, up to the constant 1 / rl.max_new_tokens)."""


def rloo_advantages(ctx: RunContext, batch: Rollout) -> Tensor:
    """(B,) shaped reward minus the mean shaped reward of the other samples of its prompt.

    The KL is part of the reward before the baseline (:func:`alignkit.rl.sequence_rewards`),
    so the baseline also centres it.
    """
    shaped = sequence_rewards(ctx, batch)
    return shaped - leave_one_out_baseline(shaped, batch.group_ids)


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "rloo", RLOOConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("advantage", "rloo", rloo_advantages)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    return AlgorithmNeeds(kl_in="reward", min_group_size=2)
