"""Gathering the ranks' rollouts into the global batch (data parallel)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from alignkit.batch import Rollout
from alignkit.context import RunContext

__all__ = ["gather_rollout", "merge_rollouts"]


def merge_rollouts(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Per-rank rollouts (in rank order) as one batch: :meth:`Rollout.cat`."""
    return Rollout.cat(parts, pad_token_id)


def _to_device(batch: Rollout, device: torch.device) -> Rollout:
    """The same rollout with every tensor (fields, components, extras) on ``device``."""
    out = dataclasses.replace(batch)
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, torch.Tensor):
            setattr(out, f.name, value.to(device))
    out.reward_components = {k: v.to(device) for k, v in batch.reward_components.items()}
    out.extras = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.extras.items()
    }
    return out


def gather_rollout(ctx: RunContext, batch: Rollout) -> Rollout:
    """Every rank's rollout merged into the global batch (identical on every rank)."""
    parts = ctx.backend.all_gather_object(_to_device(batch, torch.device("cpu")))
    pad = int(getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
    return _to_device(merge_rollouts(parts, pad), batch.response_ids.device)
