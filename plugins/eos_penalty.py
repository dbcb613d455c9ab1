"""``reward=[...,eos_penalty]``: a reward component for responses that never emit EOS.

A response cut off at ``rl.max_new_tokens`` is usually an unfinished ramble; a learned reward
model can still score it well, and the policy learns to exploit that (Huang et al. 2024, "The
N implementation details of RLHF with PPO", detail 23). The component is 1 for a truncated
response and 0 otherwise (``Rollout.finished``, set by the rollout); its weight is the
(negative) penalty, e.g. ``reward.eos_penalty.weight=-1``. Learned reward models see the
truncation too: they score a cut response without EOS
(:func:`alignkit.rewards.learned.encode_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import RewardConfig, store_reward


@dataclass
class EOSPenaltyConfig(RewardConfig):
    weight: float = -1.0


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_reward(config_store, "eos_penalty", EOSPenaltyConfig)


@hookimpl
def reward(ctx: RunContext, batch: Rollout) -> dict[str, torch.Tensor]:
    if batch.finished is None:
        raise ValueError("eos_penalty needs Rollout.finished from the rollout")
    return {"eos_penalty": (~batch.finished).float()}
