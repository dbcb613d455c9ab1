"""``reward=rm_ensemble``: several reward models scored together.

Each member is a trained reward-model folder (``stage=reward_model`` with
``reward_model.ensemble_size=N`` writes ``reward_model/member_<i>``; listing the parent folder
in ``paths`` counts as all of its members). Each member's score is normalised on its own
(mean 0, std 1 on reference samples), then combined per rollout:

* ``mode=mean``: ``mean_e r_e`` (Eisenstein et al. 2023);
* ``mode=conservative``: ``mean_e r_e - k * std_e r_e`` (population std), which pays less
  for responses the members disagree on, the signature of reward hacking (Coste et al. 2023,
  who penalise the variance);
* ``mode=min``: worst-case optimisation (Coste et al. 2023).

Members are trained with any preference loss (``reward=bradley_terry
reward_model.ensemble_size=3``); ``reward=rm_ensemble`` at ``stage=reward_model`` trains the
members with the default Bradley-Terry loss. The ensemble has no loss of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import RewardConfig, store_reward
from alignkit.reward_models import reward_hook, scorer_for

NAME = "rm_ensemble"


@dataclass
class RMEnsembleConfig(RewardConfig):
    paths: list[str] = field(default_factory=list)
    """Member reward-model folders (a folder of ``member_<i>`` folders counts as all)."""
    mode: str = "mean"
    """mean | conservative (mean - k * std) | min."""
    k: float = 1.0
    """Weight of the members' std in ``conservative`` mode."""
    batch_size: int = 64
    """Sequences per forward when scoring rollouts."""
    max_length: int | None = None
    """Tokens per scored sequence; null: each member's position limit."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_reward(config_store, NAME, RMEnsembleConfig)


@hookimpl
def run_start(ctx: RunContext) -> None:
    scorer_for(ctx, NAME)


@hookimpl
def reward(ctx: RunContext, batch: Rollout) -> dict[str, torch.Tensor]:
    return reward_hook(ctx, batch, NAME)
