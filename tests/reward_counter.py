"""A reward plugin that scores 0 and records each call (step and rows) in COUNTER_LOG."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from alignkit import RewardConfig, Rollout, RunContext, hookimpl, store_reward


@dataclass
class CounterConfig(RewardConfig):
    weight: float = 0.0


@hookimpl
def register_configs(config_store: Any) -> None:
    store_reward(config_store, "counter", CounterConfig)


@hookimpl
def reward(ctx: RunContext, batch: Rollout) -> dict[str, torch.Tensor]:
    with open(os.environ["COUNTER_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": ctx.step, "rows": batch.num_rows}) + "\n")
    return {"counter": torch.zeros(batch.num_rows)}
