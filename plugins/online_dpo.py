"""``algorithm=online_dpo``: online DPO (Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback", Algorithm 1), with the best-versus-worst pair of each prompt's samples
(Dong et al. 2024, "RLHF Workflow", Sec. 3).

Each step samples ``rl.samples_per_prompt`` (>= 2) responses per prompt from the current
policy, scores them with the configured rewards (a reward model, a judge or any mix), and
takes a DPO step on the pair of each prompt's highest- and lowest-scored responses::

    y_w = argmax_i r(x, y_i),   y_l = argmin_i r(x, y_i)
    L   = -log sigmoid(beta * (log pi(y_w)/ref(y_w) - log pi(y_l)/ref(y_l)))    DPO eq. 7

A prompt whose responses all score alike gives no pair. Any registered preference loss
applies (``algorithm.preference_loss``: sigmoid, ipo, simpo). The engine's metrics describe all
the samples; ``pref/*`` describe the pairs and ``pref/pairs`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignkit import AlgorithmNeeds, Rollout, RunContext, hookimpl, store_algorithm
from alignkit.rl import PreferenceConfig, pair_batch, preference_update


@dataclass
class OnlineDPOConfig(PreferenceConfig):
    name: str = "online_dpo"


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "online_dpo", OnlineDPOConfig)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    free = str(cfg.algorithm.preference_loss) == "simpo"  # the one reference-free loss
    return AlgorithmNeeds(reference=not free, advantages=False, kl_in="none", min_group_size=2)


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    # On the global batch: every rank picks the same pairs.
    return preference_update(ctx, pair_batch(batch))
