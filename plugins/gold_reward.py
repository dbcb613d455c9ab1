"""``reward=gold``: the task's gold oracle as a reward component.

The oracle is the simulated human of the built-in task. Using it directly as the RL reward
is the rule-based setting (e.g. verifiable answers); comparing it with a learned reward shows
over-optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import RewardConfig, store_reward


@dataclass
class GoldRewardConfig(RewardConfig):
    weight: float = 1.0


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_reward(config_store, "gold", GoldRewardConfig)


@hookimpl
def reward(ctx: RunContext, batch: Rollout) -> dict[str, torch.Tensor]:
    scores = [
        ctx.task.gold_score(r, s) for r, s in zip(batch.records, batch.responses, strict=True)
    ]
    return {"gold": torch.tensor(scores, dtype=torch.float32)}
