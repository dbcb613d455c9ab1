"""Non-finite guards of the RL loop: one NaN must not destroy the policy or its checkpoints.

The policy is protected at three points, each chosen so that the run either recovers or
stops while everything on disk is still good:

* **Rewards** (:func:`check_reward_components`): a NaN/Inf in a reward component would flow
  into every advantage and every weight. There is nothing sound to train on, so the run stops
  with :class:`NonFiniteError` naming the component, the step and the rows, before the update.
* **Gradients** (:func:`guard_optimizer`): a non-finite loss or gradient (an overflow, a
  ``log(0)``) is usually transient, so that optimizer step is skipped: its gradients are
  dropped before ``optimizer.step()`` reads them, and the skip is counted. The engine stops
  after ``rl.max_consecutive_skips`` RL steps in a row with skipped updates.
* **Parameters** (:func:`check_finite_parameters`): checked before every checkpoint and the
  final save, so a non-finite state is never written and never causes a good checkpoint to be
  pruned.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import AlignkitError


class NonFiniteError(AlignkitError):
    """A reward, loss or parameter became NaN/Inf; the message names what and at which step."""


def nonfinite_rows(scores: Tensor) -> list[int]:
    """Row indices of ``scores`` (B,) that are NaN or Inf."""
    return torch.nonzero(~torch.isfinite(scores.detach().float().reshape(-1))).flatten().tolist()


def check_reward_components(components: Mapping[str, Tensor], step: int) -> None:
    """Raise :class:`NonFiniteError` naming the first reward component with a NaN/Inf row."""
    for name, scores in components.items():
        rows = nonfinite_rows(scores)
        if rows:
            values = ", ".join(str(scores.reshape(-1)[i].item()) for i in rows[:3])
            raise NonFiniteError(
                f"reward component {name!r} is not finite at step {step} "
                f"({len(rows)} of {scores.numel()} rows, e.g. row {rows[0]} = {values}); "
                "stopped before the update, so the policy and the checkpoints are unchanged"
            )


def _local(t: Tensor) -> Tensor:
    # A DTensor (FSDP) is checked through its local shard; callers combine across ranks.
    return t.to_local() if hasattr(t, "to_local") else t


class StepGuard:
    """Skips an optimizer's step when its gradients are not finite; counts the skips."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.skipped = 0
        self._handle = optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return
        # The total norm is collective for sharded gradients, so every rank decides alike.
        norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if bool(torch.isfinite(norm)):
            return
        # Optimizers skip parameters without a gradient: dropping them all skips the step
        # (and leaves the moment estimates and step counts untouched).
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1


_guards: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepGuard] = weakref.WeakKeyDictionary()


def guard_optimizer(optimizer: torch.optim.Optimizer) -> StepGuard:
    """Install (once) the non-finite step guard on ``optimizer``; return it."""
    guard = _guards.get(optimizer)
    if guard is None:
        guard = _guards[optimizer] = StepGuard(optimizer)
    return guard


def skipped_steps() -> int:
    """Optimizer steps skipped so far by every guard in this process (read as a difference)."""
    return sum(g.skipped for g in list(_guards.values()))


def parameters_finite(params: Iterable[Tensor], backend: Any = None) -> bool:
    """Whether every parameter is finite (on every rank, when ``backend`` is distributed)."""
    ok = all(bool(torch.isfinite(_local(p.detach())).all()) for p in params)
    if backend is not None and getattr(backend, "distributed", False):
        ok = all(backend.all_gather_object(ok))
    return ok


def check_finite_parameters(
    module: torch.nn.Module, what: str, step: int, backend: Any = None
) -> None:
    """Raise :class:`NonFiniteError` before ``what`` is written if a parameter is NaN/Inf."""
    if not parameters_finite(module.parameters(), backend):
        raise NonFiniteError(
            f"the policy's parameters are not finite at step {step}: {what} not written "
            "(the checkpoints already on disk are kept)"
        )
