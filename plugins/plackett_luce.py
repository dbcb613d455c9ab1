"""``reward=plackett_luce``: a listwise preference model for K-wise rankings.

Training (``stage=reward_model``): the Plackett-Luce model (Plackett 1975; Luce 1959) draws a
ranking best-first, each time choosing among the responses still unplaced with probability
``softmax(r)``. Its negative log-likelihood for a group ranked ``y_1 > y_2 > ... > y_K`` is::

    L = - sum_{k=1}^{K-1} [ r(x, y_k) - log sum_{j >= k} exp r(x, y_j) ]

Ties: responses with equal rank form a block. Each member of a block is scored against the
same set (every response not ranked above the block: Breslow's approximation of the tied
likelihood), and the last block contributes nothing (what is left is not ordered). So a group
ranked ``a > {b, c}`` gives ``-[r_a - log(e^r_a + e^r_b + e^r_c)]``, exactly the probability
that ``a`` is drawn first, and for K = 2 the loss is Bradley-Terry. Groups with every response
tied carry no preference and are skipped. The loss is the mean over groups.

``all_pairs=true`` uses the InstructGPT alternative instead (Ouyang et al. 2022, eq. 1): the
Bradley-Terry loss over all C(K, 2) ordered pairs of a group, averaged within the group and
then over groups, so each prompt weighs the same whatever its K.

RL: the trained model at ``reward.plackett_luce.path`` scores rollouts (component
``plackett_luce``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.rewards.learned import LearnedRewardConfig, LearnedRewardPlugin, RewardBatch

NAME = "plackett_luce"


@dataclass
class PlackettLuceConfig(LearnedRewardConfig):
    all_pairs: bool = False
    """Train on all ordered pairs of each ranking (InstructGPT) instead of the listwise loss."""


def _group_mean(per_group: Tensor, has_terms: Tensor) -> Tensor:
    """Mean of (G,) losses over the groups that have any term (0 if none has)."""
    if not bool(has_terms.any()):
        return per_group.sum() * 0.0  # keeps the graph, so backward() still works
    return per_group[has_terms].mean()


def plackett_luce_loss(rewards: Tensor, ranks: Tensor, mask: Tensor) -> Tensor:
    """Listwise Plackett-Luce negative log-likelihood with Breslow ties (see the module doc).

    Args:
        rewards: (G, K) rewards of each group's responses (any value on padding).
        ranks: (G, K) dense ranks, 0 best, equal for ties.
        mask: (G, K) bool, True on real responses.

    Returns:
        Scalar: mean over groups of ``-sum_i [r_i - logsumexp_{j: rank_j >= rank_i} r_j]``,
        the sum running over responses outside the last (worst) block.
    """
    valid_j = mask[:, None, :]  # (G, 1, K)
    risk = valid_j & (ranks[:, None, :] >= ranks[:, :, None])  # (G, K, K): j still unplaced at i
    scores = rewards[:, None, :].expand_as(risk).masked_fill(~risk, float("-inf"))
    log_norm = torch.logsumexp(scores, dim=-1)  # (G, K)
    worst = ranks.masked_fill(~mask, -1).max(dim=-1, keepdim=True).values  # (G, 1)
    terms = mask & (ranks < worst)  # (G, K): the last block contributes nothing
    log_lik = torch.where(terms, rewards - log_norm, torch.zeros_like(rewards))
    return _group_mean(-log_lik.sum(-1), terms.any(-1))


def all_pairs_loss(rewards: Tensor, ranks: Tensor, mask: Tensor) -> Tensor:
    """InstructGPT's K-wise loss (Ouyang et al. 2022, eq. 1)::

        L = mean_g 1/|P_g| sum_{(i, j) in P_g} -log sigmoid(r_i - r_j)

    with ``P_g`` the pairs of group g with ``rank_i < rank_j`` (ties give no pair).

    Args: as :func:`plackett_luce_loss`. Returns a scalar.
    """
    pair = mask[:, :, None] & mask[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    nll = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])  # (G, K, K)
    count = pair.sum(dim=(1, 2))
    per_group = torch.where(pair, nll, torch.zeros_like(nll)).sum(dim=(1, 2))
    return _group_mean(per_group / count.clamp(min=1), count > 0)


@dataclass
class PlackettLuceLoss:
    """The ``rm_loss`` component: listwise Plackett-Luce, or all pairs."""

    requires: ClassVar[str] = "pairs"
    all_pairs: bool = False

    def __call__(self, rewards: Tensor, batch: RewardBatch) -> Tensor:
        """(M,) rewards -> scalar loss over the batch's G groups."""
        grouped = batch.group_rewards(rewards)
        fn = all_pairs_loss if self.all_pairs else plackett_luce_loss
        return fn(grouped, batch.ranks, batch.mask)


def make_loss(cfg: Any = None) -> PlackettLuceLoss:
    node = cfg if cfg is not None else PlackettLuceConfig()
    return PlackettLuceLoss(all_pairs=bool(node.all_pairs))


_plugin = LearnedRewardPlugin(NAME, PlackettLuceConfig, loss=make_loss)
# The hooks every learned reward shares (alignkit.rewards.learned.LearnedRewardPlugin).
register_configs, register_components = _plugin.register_configs, _plugin.register_components
run_start, reward = _plugin.run_start, _plugin.reward
