"""Rollout engines: what samples the responses of an RL step (``rollout=native|vllm``).

The core's ``rollout`` hook renders and pads the prompts, asks the configured engine for the
responses and builds the :class:`~alignkit.batch.Rollout`. An engine is a registered component
(kind ``rollout_engine``), so a plugin adds one with ``registry.add("rollout_engine", name,
factory)``; ``factory(ctx)`` returns an object with

* ``trainer_logprobs: bool``: whether its log-probs are the trainer's own (the native sampler
  runs the policy itself); when not, the rollout recomputes them with the trainer at the same
  weights and the update corrects for the mismatch (:mod:`alignkit.rollout.mismatch`);
* ``generate(ctx, prompt_ids, prompt_mask, stop_ids, rows) -> GenerationOutput``: responses,
  sampling log-probs and finished flags for (B, P) left-padded prompts (``rows``: this
  rank's place in the global batch, as :func:`alignkit.models.generation.generate` takes it).

An engine that holds its own copy of the weights (vLLM) syncs them from ``ctx.policy``
whenever the policy changed since its last call.
"""

from alignkit.rollout.engines import (
    ENGINE_LOGPROBS,
    ENGINE_STATE_KEY,
    IS_WEIGHTS,
    NativeEngine,
    RolloutEngine,
    rollout_engine,
)
from alignkit.rollout.mismatch import MismatchCorrection, correction_weights, mismatch_metrics

__all__ = [
    "ENGINE_LOGPROBS",
    "ENGINE_STATE_KEY",
    "IS_WEIGHTS",
    "MismatchCorrection",
    "NativeEngine",
    "RolloutEngine",
    "correction_weights",
    "mismatch_metrics",
    "rollout_engine",
]
