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

from alignkit.config import RewardConfig
from alignkit.rewards.learned import LearnedRewardPlugin

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


_plugin = LearnedRewardPlugin(NAME, RMEnsembleConfig, min_members=2)
# The hooks every learned reward shares (alignkit.rewards.learned.LearnedRewardPlugin).
register_configs, register_components = _plugin.register_configs, _plugin.register_components
run_start, reward = _plugin.run_start, _plugin.reward
