"""The feedback and reward-model stages: ``stage=feedback`` and ``stage=reward_model``.

``stage=feedback`` samples K responses per prompt from a policy and has the configured
annotator label them; ``stage=reward_model`` trains a scalar-head reward model on the result
with the loss of the active ``reward=`` plugin. Both are documented in ``docs/feedback.md``.
"""

from __future__ import annotations

from alignkit import hookimpl
from alignkit.registry import ComponentRegistry


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    from alignkit.stages.feedback import run_feedback
    from alignkit.stages.reward_model import run_reward_model

    registry.add("stage", "feedback", run_feedback)
    registry.add("stage", "reward_model", run_reward_model)
