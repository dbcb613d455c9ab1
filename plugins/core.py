"""The core plugin: the built-in task and stages, and the default sampling rollout.

Always active. Its ``rollout`` is registered ``trylast`` so an algorithm plugin may replace
it (an offline method reads stored pairs instead of sampling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit import AlgorithmNeeds, Rollout, RunContext, hookimpl
from alignkit.registry import ComponentRegistry
from alignkit.rl import estimate_advantages, policy_gradient_update, register_builtins
from alignkit.rl.critic import load_critic, save_critic
from alignkit.rollout import NativeEngine
from alignkit.tasks import AssistTask
from alignkit.tasks.data import DataTask


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    from alignkit.stages.evaluate import run_eval
    from alignkit.stages.pipeline import run_pipeline
    from alignkit.stages.rl import run_rl
    from alignkit.stages.sft import run_sft

    registry.add("task", "assist", AssistTask)
    registry.add("task", "data", DataTask)
    registry.add("rollout_engine", "native", NativeEngine)
    register_builtins(registry)
    registry.add("stage", "sft", run_sft)
    registry.add("stage", "rl", lambda ctx: run_rl(ctx)[0])
    registry.add("stage", "eval", run_eval)
    registry.add("stage", "pipeline", run_pipeline)


@hookimpl(trylast=True)
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    """The defaults: an on-policy method, scored by the configured rewards, KL in the reward."""
    return AlgorithmNeeds()


@hookimpl(trylast=True)
def rollout(ctx: RunContext, records: list[Any]) -> Rollout:
    """Sample ``rl.samples_per_prompt`` responses per prompt with the current policy.

    ``ctx.sample(records)`` (:mod:`alignkit.rollout.sampling`): the configured engine samples
    (``rollout=native``: alignkit's sampler with the KV cache and the run's seeded generator;
    ``rollout=vllm``: vLLM, :mod:`alignkit.rollout`) and takes the sampling log-probs (from
    ``logits / temperature``); when they are not the trainer's, the trainer's are computed
    too and the mismatch weights set. With a reference policy (``rl.kl_coef > 0``, or an
    algorithm that needs one) the reference log-probs and the per-token KL are set. Seconds
    are logged as ``time/rollout/generation``, ``time/rollout/trainer_logprobs`` and
    ``time/rollout/ref``.
    """
    return ctx.sample(records)


@hookimpl(trylast=True)
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    """The registered advantage estimator named by ``algorithm.advantage_estimator``
    (:mod:`alignkit.rl.advantages`); the batch unchanged when the algorithm names none."""
    if ctx.cfg.algorithm.get("advantage_estimator") is None:
        return batch
    return estimate_advantages(ctx, batch)


@hookimpl(trylast=True)
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    """The policy-gradient update with the registered policy loss named by
    ``algorithm.policy_loss`` (:func:`alignkit.rl.policy_gradient_update`)."""
    return policy_gradient_update(ctx, batch)


@hookimpl
def save_checkpoint(ctx: RunContext, directory: Path) -> None:
    """The critic of an algorithm that declared one (:mod:`alignkit.rl.critic`)."""
    if ctx.needs.critic:
        save_critic(ctx, directory)


@hookimpl
def load_checkpoint(ctx: RunContext, directory: Path) -> None:
    if ctx.needs.critic:
        load_critic(ctx, directory)
