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
``rl.samples_per_prompt=1`` (no other sample to leave out) is refused at config time
(:mod:`alignkit.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.ops import leave_one_out_baseline
from alignkit.training import (
    ClippedPGConfig,
    kl_in_reward_update,
    reference_kl,
)
from alignkit.validate import require_groups


@dataclass
class RLOOConfig(ClippedPGConfig):
    name: str = "rloo"
    loss_agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (the paper's sequence-level
    objective, up to the constant 1 / rl.max_new_tokens)."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "rloo", RLOOConfig)


@hookimpl
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    assert batch.rewards is not None
    require_groups("rloo", batch.group_size)
    kl_coef = float(ctx.cfg.rl.kl_coef)
    kl_seq = reference_kl(batch, "k1").sum(1)
    # The KL is part of the reward before the baseline, so the baseline also centres it.
    shaped = batch.rewards - kl_coef * kl_seq
    adv = shaped - leave_one_out_baseline(shaped, batch.group_ids)
    batch.advantages = adv[:, None] * batch.response_mask
    batch.extras["kl_seq"] = kl_seq
    return batch


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    return kl_in_reward_update(ctx, batch)
