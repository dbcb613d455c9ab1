"""Active selection: which prompts' samples to spend the label budget on.

With ``feedback.selection=random`` (the default) the feedback stage labels prompts in a seeded
random order until ``feedback.max_labels`` is spent. The other criteria score each prompt's K
distinct samples with a trained reward model (``feedback.selection_model``: a folder, or a
folder of ``member_<i>`` folders for an ensemble) and label the prompts it is least sure
about first:

* ``disagreement``: query by committee. For every pair (i, j) of a prompt's samples each
  member e gives a Bradley-Terry probability ``p_e = sigmoid(r_e(i) - r_e(j))``; the prompt's
  score is the members' (population) standard deviation of ``p_e``, averaged over its pairs.
  Members that agree give 0 however close to 1/2 the probability is: this is the epistemic
  part of the uncertainty, what more labels can reduce (Dwaracherla et al. 2024, "Efficient
  Exploration for LLMs", choose queries by an ensemble's uncertainty). Needs two or more
  members.
* ``uncertainty``: margin sampling on the mean model. The prompt's score is
  ``1 - |2 p - 1|`` averaged over its pairs, with ``p`` the members' mean probability: 1 for a
  coin flip, 0 for a sure ordering. Works with one model; it cannot tell a pair the model has
  not learned from a pair that is a genuine tie, whose labels are noise either way.

Scores are averaged over pairs (not summed) because a ranking's cost grows with its pairs
(``label_cost``): the criterion is information per label. Ties keep the seeded random order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.context import RunContext
from alignkit.errors import ConfigError
from alignkit.tracking import console

__all__ = [
    "SELECTIONS",
    "disagreement",
    "pair_probabilities",
    "prompt_order",
    "uncertainty",
]


def pair_probabilities(scores: Tensor) -> Tensor:
    """(E, K) member rewards of K responses -> (E, K (K - 1) / 2) Bradley-Terry probabilities
    ``sigmoid(r_i - r_j)`` for every pair i < j (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1)."""
    if scores.dim() != 2:
        raise ValueError(f"expected (E, K) member scores, got shape {tuple(scores.shape)}")
    i, j = torch.triu_indices(scores.shape[1], scores.shape[1], offset=1)
    return torch.sigmoid(scores[:, i] - scores[:, j])


def disagreement(scores: Tensor) -> float:
    """Mean over pairs of the members' population std of ``P(i > j)``; (E, K) -> scalar."""
    if scores.shape[1] < 2:
        return 0.0
    return float(pair_probabilities(scores).std(0, unbiased=False).mean())


def uncertainty(scores: Tensor) -> float:
    """Mean over pairs of ``1 - |2 p - 1|``, ``p`` the members' mean ``P(i > j)``; (E, K) ->
    scalar in [0, 1]."""
    if scores.shape[1] < 2:
        return 0.0
    p = pair_probabilities(scores).mean(0)
    return float((1.0 - (2.0 * p - 1.0).abs()).mean())


SELECTIONS: dict[str, Callable[[Tensor], float] | None] = {
    "random": None,
    "disagreement": disagreement,
    "uncertainty": uncertainty,
}
"""``feedback.selection`` -> the per-prompt criterion (None: the seeded random order)."""


def check_selection(ctx: RunContext) -> str:
    """``feedback.selection``, checked against the model it needs; raises ConfigError."""
    fcfg = ctx.cfg.feedback
    name = str(fcfg.get("selection", "random"))
    if name not in SELECTIONS:
        raise ConfigError(f"feedback.selection={name!r}; expected one of {', '.join(SELECTIONS)}")
    if name != "random" and fcfg.get("max_labels") is None:
        raise ConfigError(
            f"feedback.selection={name} chooses what to label within a budget, but "
            "feedback.max_labels is not set (every prompt would be labelled)"
        )
    if name != "random" and not fcfg.get("selection_model"):
        raise ConfigError(
            f"feedback.selection={name} ranks prompts with a trained reward model: set "
            "feedback.selection_model=<reward_model folder> (pipeline.rounds sets it to the "
            "previous round's)"
        )
    return name


def member_scores(
    ctx: RunContext, folder: str | Path, records: Sequence[Any], groups: Sequence[list[str]]
) -> list[Tensor]:
    """Each record's (E, K) rewards of its responses under every member of ``folder``."""
    from alignkit.data.prompts import conversation, template_mode
    from alignkit.rewards.learned import load_scorer, member_folders

    template = template_mode(ctx.cfg)
    raw = template == "raw"
    rows = [(r, text) for r, g in zip(records, groups, strict=True) for text in g]
    prompts = [ctx.task.format_prompt(r) for r, _ in rows]
    responses = [text for _, text in rows]
    convs = [conversation(ctx.task, r, raw) for r, _ in rows]
    members = member_folders(folder)
    key = "feedback.selection_model"
    scores = []
    for path in members:
        scorer = load_scorer(path, device=ctx.device, key=key, template=template)
        scores.append(scorer.score(prompts, responses, convs))
    flat = torch.stack(scores)  # (E, total responses)
    out, start = [], 0
    for g in groups:
        out.append(flat[:, start : start + len(g)])
        start += len(g)
    return out


def prompt_order(
    ctx: RunContext, records: Sequence[Any], groups: Sequence[list[str]], seed: int
) -> list[int]:
    """Indices of ``records`` in the order their labels are bought: the seeded random order,
    stably sorted by the ``feedback.selection`` criterion (highest first)."""
    order = random.Random(seed).sample(range(len(records)), len(records))
    name = check_selection(ctx)
    criterion = SELECTIONS[name]
    if criterion is None:
        return order
    from alignkit.rewards.learned import member_folders

    folder = str(ctx.cfg.feedback.selection_model)
    members = len(member_folders(folder))
    if name == "disagreement" and members < 2:
        raise ConfigError(
            f"feedback.selection=disagreement needs an ensemble: {folder} holds one reward "
            "model; train it with reward_model.ensemble_size >= 2, or use "
            "feedback.selection=uncertainty"
        )
    scores = member_scores(ctx, folder, records, groups)
    value = [criterion(s) for s in scores]
    ranked = sorted(order, key=lambda i: -value[i])
    top = [value[i] for i in ranked[: max(1, len(ranked) // 4)]]
    console.print(
        f"feedback: prompts ordered by {name} of {members} reward model(s) in {folder}: "
        f"mean {sum(value) / max(1, len(value)):.4f}, top quarter {sum(top) / len(top):.4f}"
    )
    return ranked
