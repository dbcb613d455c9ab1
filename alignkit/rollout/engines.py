"""The rollout-engine protocol, the native sampler, and the engine of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from alignkit.context import RunContext
from alignkit.models.generation import GenerationOutput, generate

__all__ = [
    "ENGINE_LOGPROBS",
    "ENGINE_STATE_KEY",
    "IS_WEIGHTS",
    "NativeEngine",
    "RolloutEngine",
    "SamplingOptions",
    "rollout_engine",
]

ENGINE_LOGPROBS = "rollout/engine_logprobs"
"""``Rollout.extras`` key: (B, R) log-probs the sampling engine reported, when they are not the
trainer's (``Rollout.logprobs`` then holds the trainer's, at the same weights)."""
IS_WEIGHTS = "rollout/is_weights"
"""``Rollout.extras`` key: (B, R) mismatch-correction weights that multiply each token's
policy-gradient loss (:func:`alignkit.rollout.mismatch.correction_weights`)."""
ENGINE_STATE_KEY = "rollout/engine"
"""``ctx.state`` key of the run's engine object (not checkpointed)."""


@dataclass(frozen=True)
class SamplingOptions:
    """How one rollout call samples (``rl.*`` by default; ``RunContext.sample`` overrides)."""

    temperature: float
    """Divides the logits; the log-probs are taken at it."""
    max_new_tokens: int
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    """Take the arg-max token (log-probs still at ``temperature``)."""

    @classmethod
    def from_config(
        cls, rl: Any, *, greedy: bool = False, temperature: float | None = None
    ) -> SamplingOptions:
        """The ``rl`` node's settings, with the given overrides."""
        return cls(
            temperature=float(rl.temperature) if temperature is None else float(temperature),
            max_new_tokens=int(rl.max_new_tokens),
            top_k=int(rl.get("top_k", 0)),
            top_p=float(rl.get("top_p", 1.0)),
            greedy=greedy,
        )


class RolloutEngine(Protocol):
    """What samples an RL step's responses (see :mod:`alignkit.rollout`)."""

    trainer_logprobs: bool

    def generate(
        self,
        ctx: RunContext,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        stop_ids: Sequence[int],
        rows: tuple[int, int],
        options: SamplingOptions | None = None,
    ) -> GenerationOutput: ...


class NativeEngine:
    """``rollout=native``: alignkit's own sampler on the policy (:func:`generate`).

    Its log-probs are the trainer's: the same model, the same weights, the same maths.
    """

    trainer_logprobs = True

    def __init__(self, ctx: RunContext) -> None:
        self.cfg = ctx.cfg.rl

    def generate(
        self,
        ctx: RunContext,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        stop_ids: Sequence[int],
        rows: tuple[int, int],
        options: SamplingOptions | None = None,
    ) -> GenerationOutput:
        assert ctx.policy is not None and ctx.tokenizer is not None
        policy, opts = ctx.policy, options or SamplingOptions.from_config(self.cfg)
        was_training = policy.training
        policy.eval()
        try:
            return generate(
                policy,
                prompt_ids,
                prompt_mask,
                max_new_tokens=opts.max_new_tokens,
                eos_token_id=list(stop_ids),
                pad_token_id=ctx.tokenizer.pad_token_id,
                temperature=opts.temperature,
                top_k=opts.top_k,
                top_p=opts.top_p,
                greedy=opts.greedy,
                generator=ctx.generator,
                rows=rows,
            )
        finally:
            policy.train(was_training)


def rollout_engine(ctx: RunContext) -> Any:
    """The run's engine (``rollout.name``, default ``native``), built once and kept in
    ``ctx.state`` (not checkpointed: an engine is rebuilt, and re-synced, on resume)."""
    engine = ctx.state.get(ENGINE_STATE_KEY)
    if engine is None:
        node = ctx.cfg.get("rollout") or {}
        name = str(node.get("name", "native"))
        engine = ctx.state[ENGINE_STATE_KEY] = ctx.registry.get("rollout_engine", name)(ctx)
    return engine
