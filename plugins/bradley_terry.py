"""``reward=bradley_terry``: a pairwise preference model and its learned reward.

Training (``stage=reward_model``): the Bradley-Terry model (Bradley & Terry 1952) says
``P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))``; the reward model minimises the negative
log-likelihood of the labelled pairs (Ouyang et al. 2022, eq. 1). Two optional terms:

* margin (Touvron et al. 2023, Llama 2, eq. 2): ``-log sigmoid(r_c - r_r - m)`` with
  ``m = margin_scale * margin`` asks for a larger gap on pairs labelled as a clear preference
  (a pair's ``margin`` field; for ratings, the rating gap);
* reward centering (Eisenstein et al. 2023): ``eta * (r_c + r_r)^2`` pins the free offset of
  the rewards near 0, which the pairwise likelihood leaves undetermined;
* label smoothing for noisy labels: with ``e`` the probability that a label is flipped, the
  likelihood of the observed label is ``(1 - e) sigmoid(g) + e sigmoid(-g)``; its common
  bound ``-(1 - e) log sigmoid(g) - e log sigmoid(-g)`` (the conservative DPO loss, Mitchell
  2023) stops the model from growing without bound on pairs it is sure of, so a few flipped
  labels pull the rewards less.

Rankings train on every ordered pair they imply; ratings on every differently rated pair.

RL: the trained model at ``reward.bradley_terry.path`` scores each rollout through the
``reward`` hook (component ``bradley_terry``), re-encoding the text with its own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.rewards.learned import LearnedRewardConfig, LearnedRewardPlugin, RewardBatch

NAME = "bradley_terry"


@dataclass
class BradleyTerryConfig(LearnedRewardConfig):
    margin_scale: float = 0.0
    """Multiplies each pair's margin in the Llama 2 margin term; 0 is plain Bradley-Terry."""
    center_coef: float = 0.0
    """eta of the reward-centering term ``eta * (r_c + r_r)^2`` (Eisenstein et al. use 0.01)."""
    label_smoothing: float = 0.0
    """``e``, the expected fraction of flipped labels (0: plain Bradley-Terry)."""


def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean Bradley-Terry negative log-likelihood over P pairs, with optional margin and
    centering::

        g_p = r_c,p - r_r,p - m_p
        L   = 1/P sum_p [ -(1 - e) log sigmoid(g_p) - e log sigmoid(-g_p)
                          + eta * (r_c,p + r_r,p)^2 ]

    Args:
        chosen: (P,) rewards of the preferred responses.
        rejected: (P,) rewards of the other responses.
        margin: (P,) margins ``m_p`` (None: 0).
        center_coef: ``eta``.
        label_smoothing: ``e``.

    Returns:
        Scalar loss.
    """
    gap = chosen - rejected
    if margin is not None:
        gap = gap - margin
    loss = -F.logsigmoid(gap).mean()
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-gap).mean()
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).pow(2).mean()
    return loss


@dataclass
class BradleyTerryLoss:
    """The ``rm_loss`` component: :func:`bradley_terry_loss` on a batch's pairs."""

    requires: ClassVar[str] = "pairs"
    margin_scale: float = 0.0
    center_coef: float = 0.0
    label_smoothing: float = 0.0

    def __call__(self, rewards: Tensor, batch: RewardBatch) -> Tensor:
        """(M,) rewards -> scalar loss over the batch's P pairs."""
        margin = self.margin_scale * batch.margin if self.margin_scale else None
        return bradley_terry_loss(
            rewards[batch.chosen],
            rewards[batch.rejected],
            margin,
            self.center_coef,
            self.label_smoothing,
        )


def make_loss(cfg: Any = None) -> BradleyTerryLoss:
    """The loss configured by ``reward.bradley_terry`` (the defaults when ``cfg`` is None)."""
    node = cfg if cfg is not None else BradleyTerryConfig()
    if not 0.0 <= float(node.label_smoothing) < 0.5:
        raise ConfigError(
            f"reward.{NAME}.label_smoothing={node.label_smoothing}: the fraction of flipped "
            "labels must be in [0, 0.5)"
        )
    return BradleyTerryLoss(
        float(node.margin_scale), float(node.center_coef), float(node.label_smoothing)
    )


_plugin = LearnedRewardPlugin(NAME, BradleyTerryConfig, loss=make_loss)
# The hooks every learned reward shares (alignkit.rewards.learned.LearnedRewardPlugin).
register_configs, register_components = _plugin.register_configs, _plugin.register_components
run_start, reward = _plugin.run_start, _plugin.reward
