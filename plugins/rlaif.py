"""``feedback.annotator=rlaif``: the critique judge as the feedback stage's annotator (RLAIF).

AI feedback in place of human labels (Bai et al. 2022; Lee et al. 2023): the judge configured
at ``reward.critique`` (its model, template and principles) labels the policy's samples, and
``stage=feedback`` writes the same files a human annotator would, so ``stage=reward_model``
trains on them unchanged:

* ``compare(a, b)``: the pairwise template, judged in both orders (position bias cancels);
  a is preferred when ``P(a > b) >= 0.5``;
* ``rank(responses)``: each response's critique score (per principle when configured), dense
  ranks, best first; equal scores tie;
* ``rate(response)``: the score mapped onto the ``1..feedback.rating_scale`` Likert scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from alignkit import RunContext, hookimpl
from alignkit.data.feedback import dense_ranks
from alignkit.judges.config import build_critique_judge, critique_config
from alignkit.judges.critic import CritiqueJudge
from alignkit.registry import ComponentRegistry


class JudgeAnnotator:
    """Implements the :class:`alignkit.data.feedback.Annotator` protocol with a judge.

    ``format_prompt`` turns a task record into the text the policy saw.
    """

    def __init__(
        self,
        judge: CritiqueJudge,
        format_prompt: Any,
        *,
        scale: int = 7,
        both_orders: bool = True,
    ) -> None:
        self.judge = judge
        self.format_prompt = format_prompt
        self.scale = scale
        self.both_orders = both_orders

    def compare(self, record: Any, a: str, b: str) -> int:
        prompt = self.format_prompt(record)
        (res,) = self.judge.compare([prompt], [a], [b], both_orders=self.both_orders)
        return 0 if res.prob_a >= 0.5 else 1

    def scores(self, record: Any, responses: Sequence[str]) -> list[float]:
        prompt = self.format_prompt(record)
        return [j.score for j in self.judge.score([prompt] * len(responses), list(responses))]

    def rank(self, record: Any, responses: Sequence[str]) -> list[int]:
        # Scores are rounded so that numerically equal judgements tie instead of ranking by noise.
        scores = [round(s, 6) for s in self.scores(record, responses)]
        return dense_ranks(scores, higher_is_better=True)

    def rate(self, record: Any, response: str) -> float:
        (score,) = self.scores(record, [response])
        return float(math.floor(1 + (self.scale - 1) * min(1.0, max(0.0, score)) + 0.5))


def build(ctx: RunContext) -> JudgeAnnotator:
    """The annotator for ``ctx.task`` with the judge of ``reward.critique``."""
    node = critique_config(ctx.cfg)
    judge = build_critique_judge(node, ctx.device)
    return JudgeAnnotator(
        judge,
        ctx.task.format_prompt,
        scale=int(ctx.cfg.feedback.rating_scale),
        both_orders=bool(node.both_orders),
    )


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("annotator", "rlaif", build)
