"""``reward=rating_regression``: a reward model regressed on absolute ratings.

Training (``stage=reward_model``) needs ratings feedback (``feedback.format=ratings``): each
response's rating ``s`` (the overall score, or ``attribute``'s) is standardised with the
training set's mean and std, ``t = (s - mean) / std``, and the reward is fit by least squares::

    L = 1/N sum_n (r(x_n, y_n) - t_n)^2

Unlike the preference losses this pins the reward's scale and offset to the ratings, and uses
ratings of single responses that have no partner to compare with.

RL: the trained model at ``reward.rating_regression.path`` scores rollouts (component
``rating_regression``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from alignkit.rewards.learned import LearnedRewardConfig, LearnedRewardPlugin, RewardBatch

NAME = "rating_regression"


@dataclass
class RatingRegressionConfig(LearnedRewardConfig):
    attribute: str | None = None
    """Regress on this rating attribute (e.g. helpfulness); null: the overall score."""


def regression_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error ``1/N sum_n (r_n - t_n)^2`` of (N,) predictions and (N,) targets."""
    return (predictions - targets).pow(2).mean()


@dataclass
class RatingRegressionLoss:
    """The ``rm_loss`` component: :func:`regression_loss` on a batch's rated responses."""

    requires: ClassVar[str] = "ratings"
    attribute: str | None = None

    def __call__(self, rewards: Tensor, batch: RewardBatch) -> Tensor:
        """(M,) rewards -> scalar loss over the rated (G, K) slots."""
        rated = ~torch.isnan(batch.targets) & batch.mask
        return regression_loss(batch.group_rewards(rewards)[rated], batch.targets[rated])


def make_loss(cfg: Any = None) -> RatingRegressionLoss:
    node = cfg if cfg is not None else RatingRegressionConfig()
    return RatingRegressionLoss(attribute=str(node.attribute) if node.attribute else None)


_plugin = LearnedRewardPlugin(NAME, RatingRegressionConfig, loss=make_loss)
# The hooks every learned reward shares (alignkit.rewards.learned.LearnedRewardPlugin).
register_configs, register_components = _plugin.register_configs, _plugin.register_components
run_start, reward = _plugin.run_start, _plugin.reward
