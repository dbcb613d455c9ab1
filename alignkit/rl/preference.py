"""Preference optimisation on pairs: the update shared by the DPO family.

A preference loss is registered under kind ``preference_loss`` (``registry.add(
"preference_loss", name, PreferenceLoss(...))``) and chosen by ``algorithm.preference_loss``.
It is a function of each pair's score difference ``h``, where a reply's score is its policy
log-likelihood, minus the reference's when the loss needs one, summed over its tokens or
(``length_normalised``) averaged::

    s(y) = log pi(y|x) - log ref(y|x)        (or their token means; or log pi alone)
    h    = s(y_w) - s(y_l)                    (P,) one value per pair
    loss = mean over pairs of fn(h, cfg)      e.g. DPO (Rafailov et al. 2023, eq. 7):
                                              -log sigmoid(beta * h)

:func:`preference_update` runs the update: whole pairs per micro-batch, the loss averaged
over the minibatch's pairs, and metrics that describe the policy on the pairs: ``pref/accuracy``
(the implicit reward ``beta * s`` ranks the chosen reply first), ``pref/margin`` (``beta *
h``), ``pref/chosen`` and ``pref/rejected`` (the mean implicit rewards).

**Pair layout.** A preference batch holds each pair as two adjacent rows, the chosen reply at
an even row ``2k`` and the rejected one at ``2k + 1``, both with group id ``k``
(:func:`pair_batch` builds it from a sampled batch; an offline plugin encodes the replies in
that order with ``ctx.encode``). With a reference, ``Rollout.ref_logprobs`` holds its
log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.batch import Rollout
from alignkit.config import AlgorithmConfig
from alignkit.context import RunContext
from alignkit.rl.ops import masked_mean, masked_sum
from alignkit.rl.update import Counts, policy_logprobs, run_update

__all__ = [
    "PreferenceConfig",
    "PreferenceLoss",
    "best_worst_rows",
    "pair_batch",
    "pair_scores",
    "preference_update",
    "resolve_preference_loss",
]


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered preference loss: ``fn(h, cfg) -> (P,)`` per-pair losses."""

    fn: Callable[[Tensor, Any], Tensor]
    """``h`` (P,) score differences (chosen minus rejected); ``cfg`` the algorithm config."""
    reference: bool = True
    """Scores are log-ratios to the frozen reference (False: the policy's log-likelihood)."""
    length_normalised: bool = False
    """Scores are token means rather than sums."""

    def __call__(self, h: Tensor, cfg: Any) -> Tensor:
        return self.fn(h, cfg)


@dataclass
class PreferenceConfig(AlgorithmConfig):
    """Fields of a pairwise preference-optimisation algorithm (the DPO family)."""

    preference_loss: str = "sigmoid"
    """Registered preference loss: sigmoid (DPO), ipo, simpo (the dpo plugin's), or a
    plugin's."""
    beta: float = 0.1
    """Scale of the implicit reward ``beta * s`` (DPO's KL strength)."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (conservative DPO): the sigmoid loss
    becomes ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``."""
    gamma: float = 0.5
    """SimPO's target reward margin (``simpo``: ``-log sigmoid(beta h - gamma)``)."""
    epochs: int = 1
    """Passes over each step's pairs."""
    minibatch_size: int = 16
    """Rows (two per pair) per forward/backward."""
    grad_accum_steps: int = 1
    """Forward/backward passes per optimizer step."""


def resolve_preference_loss(ctx: RunContext) -> PreferenceLoss:
    """The loss ``algorithm.preference_loss`` names (an unknown name lists the registered)."""
    loss = ctx.registry.get("preference_loss", str(ctx.cfg.algorithm.preference_loss))
    if not isinstance(loss, PreferenceLoss):
        name = ctx.cfg.algorithm.preference_loss
        raise TypeError(f"preference_loss {name!r} is registered, but not as a PreferenceLoss")
    return loss


def pair_scores(
    logp: Tensor, ref_logp: Tensor | None, mask: Tensor, loss: PreferenceLoss
) -> Tensor:
    """(b,) reply scores ``s``: (b, R) token log-probs (minus the reference's) summed or
    averaged over the (b, R) ``mask``."""
    diff = logp - ref_logp if loss.reference and ref_logp is not None else logp
    return (masked_mean if loss.length_normalised else masked_sum)(diff, mask, dim=1)


def _pair_loss(
    ctx: RunContext, batch: Rollout, rows: Tensor, counts: Counts, loss: PreferenceLoss
) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's pairs' loss, as its share of the minibatch's pair mean."""
    cfg, pairs = ctx.cfg.algorithm, counts.num_seqs / 2
    rows = rows[torch.argsort(batch.group_ids[rows] * 2 + rows % 2)]  # chosen, rejected, ...
    logp, _ = policy_logprobs(ctx, batch, rows)
    ref = batch.ref_logprobs[rows] if batch.ref_logprobs is not None else None
    scores = pair_scores(logp, ref, batch.response_mask[rows], loss).view(-1, 2)
    h = scores[:, 0] - scores[:, 1]
    losses = loss(h, cfg)
    rewards = float(cfg.beta) * scores.detach()
    metrics = {
        "loss/policy": losses.detach().sum() / pairs,
        "pref/accuracy": (h.detach() > 0).float().sum() / pairs,
        "pref/margin": (rewards[:, 0] - rewards[:, 1]).sum() / pairs,
        "pref/chosen": rewards[:, 0].sum() / pairs,
        "pref/rejected": rewards[:, 1].sum() / pairs,
    }
    return losses.sum() / pairs, metrics


def preference_update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    """One step of pairwise preference optimisation on ``batch`` (the pair layout above).

    Epochs, minibatch size and accumulation come from the :class:`PreferenceConfig` fields of
    ``ctx.cfg.algorithm``; ``pref/pairs`` counts the step's pairs. A batch without pairs (an
    online step whose every group tied) takes no optimizer step and advances the schedule.
    """
    if batch.num_rows % 2:
        raise ValueError(f"a preference batch holds pairs of rows; got {batch.num_rows} rows")
    algo, loss = ctx.cfg.algorithm, resolve_preference_loss(ctx)
    if loss.reference and batch.ref_logprobs is None:
        raise ValueError(
            f"preference_loss {algo.preference_loss!r} needs the reference's log-probs "
            "(Rollout.ref_logprobs); declare AlgorithmNeeds(reference=True)"
        )
    if batch.num_rows == 0:
        if ctx.scheduler is not None:
            ctx.scheduler.step()
        return {"pref/pairs": 0.0}
    metrics = run_update(
        ctx,
        batch,
        lambda rows, counts: _pair_loss(ctx, batch, rows, counts, loss),
        epochs=int(algo.epochs),
        minibatch_size=int(algo.minibatch_size),
        grad_accum_steps=int(algo.grad_accum_steps),
        whole_groups=True,
    )
    metrics["pref/pairs"] = batch.num_rows / 2
    return metrics


def best_worst_rows(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(2P,) row indices ``[best_0, worst_0, best_1, ...]`` of every group whose rewards are
    not all equal (a tie carries no preference); first index on equal maxima or minima.

    ``rewards``, ``group_ids``: (B,), rows of a group contiguous.
    """
    rows: list[int] = []
    for g in torch.unique_consecutive(group_ids).tolist():
        members = (group_ids == g).nonzero().flatten()
        values = rewards[members]
        if values.max() > values.min():
            rows += [int(members[values.argmax()]), int(members[values.argmin()])]
    return torch.tensor(rows, dtype=torch.long, device=rewards.device)


def pair_batch(batch: Rollout) -> Rollout:
    """The (best, worst) pair of each untied group of a scored ``batch``, in the pair layout."""
    if batch.rewards is None:
        raise ValueError("pair_batch needs a scored batch (Rollout.rewards)")
    return batch.select(best_worst_rows(batch.rewards, batch.group_ids))
