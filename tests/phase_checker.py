"""A plugin that checks every phase hook does what its spec says (``plugins=[phase_check]``).

Around each phase it fingerprints every trainable weight (the policy's and the critic's) and
counts optimizer steps, through a global step hook: rollout, reward and advantage must change
no weight and take no step; update must take them all. Its findings, one JSON line per step,
go to the file named by PHASE_LOG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from alignkit import Rollout, RunContext, hookimpl

_steps: dict[str, int] = {}
_phase = {"name": "outside"}


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _steps[_phase["name"]] = _steps.get(_phase["name"], 0) + 1


_handle = register_optimizer_step_post_hook(_count_step)


def _weights(ctx: RunContext) -> list[float]:
    """A fingerprint of every trainable weight: the sum and the sum of squares per module."""
    modules = [ctx.policy, *[getattr(v, "module", None) for v in ctx.state.values()]]
    out = []
    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Module):
                params = [p.detach().double() for p in module.parameters()]
                out += [
                    float(sum(p.sum() for p in params)),
                    float(sum((p * p).sum() for p in params)),
                ]
    return out


def _checked(ctx: RunContext, phase: str) -> Generator[None, Any, Any]:
    before, steps = _weights(ctx), dict(_steps)
    _phase["name"] = phase
    try:
        result = yield
    finally:
        _phase["name"] = "outside"
    record = {
        "step": ctx.step,
        "phase": phase,
        "weights_changed": _weights(ctx) != before,
        "optimizer_steps": _steps.get(phase, 0) - steps.get(phase, 0),
    }
    with open(os.environ["PHASE_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return result


@hookimpl(wrapper=True)
def rollout(ctx: RunContext, records: list[Any]) -> Generator[None, Any, Any]:
    return (yield from _checked(ctx, "rollout"))


@hookimpl(wrapper=True)
def reward(ctx: RunContext, batch: Rollout) -> Generator[None, Any, Any]:
    return (yield from _checked(ctx, "reward"))


@hookimpl(wrapper=True)
def advantage(ctx: RunContext, batch: Rollout) -> Generator[None, Any, Any]:
    return (yield from _checked(ctx, "advantage"))


@hookimpl(wrapper=True)
def update(ctx: RunContext, batch: Rollout) -> Generator[None, Any, Any]:
    return (yield from _checked(ctx, "update"))
