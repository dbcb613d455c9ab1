"""``feedback.annotator=simulated_human``: the built-in annotator.

The task's simulated human (:class:`alignkit.tasks.SimulatedHuman`): its true preference is
the gold oracle, with seeded noise of a configurable size (``feedback.noise``; a flip
probability for pairwise labels, a Gumbel scale for rankings, a Gaussian std for ratings) and,
with ``feedback.annotator_temperature > 0``, Bradley-Terry sampled pairwise choices. It is an
``annotator`` component like any other, so a team plugs in its own labelling source the same
way (see ``docs/feedback.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignkit import RunContext, hookimpl
from alignkit.errors import ConfigError
from alignkit.registry import ComponentRegistry
from alignkit.tasks import SimulatedHuman


class SimulatedHumanAnnotator:
    """Implements the :class:`alignkit.data.feedback.Annotator` protocol with a
    :class:`SimulatedHuman`; ratings are Likert scores in ``1..scale``."""

    def __init__(self, human: SimulatedHuman, scale: int = 7) -> None:
        self.human = human
        self.scale = scale

    def compare(self, record: Any, a: str, b: str) -> int:
        return self.human.compare(record, a, b)

    def rank(self, record: Any, responses: Sequence[str]) -> list[int]:
        return self.human.rank(record, responses)

    def rate(self, record: Any, response: str) -> float:
        return float(self.human.rate(record, response, scale=self.scale))


def build(ctx: RunContext) -> SimulatedHumanAnnotator:
    """The annotator for ``ctx.task`` configured by ``feedback.*``."""
    if not hasattr(ctx.task, "gold_score"):
        raise ConfigError(
            f"feedback.annotator=simulated_human needs a task with a gold oracle, and "
            f"task={ctx.cfg.task.name} has none: give the reward model your preference data "
            "(task.preference_data), or label with an AI judge (feedback.annotator=rlaif)"
        )
    fcfg = ctx.cfg.feedback
    human = SimulatedHuman(
        ctx.task,
        noise=float(fcfg.noise),
        seed=int(fcfg.seed),
        temperature=float(fcfg.annotator_temperature),
    )
    return SimulatedHumanAnnotator(human, scale=int(fcfg.rating_scale))


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("annotator", "simulated_human", build)
