"""Registered policy losses: the per-token surrogate an update minimises.

A policy loss is a function registered under kind ``policy_loss`` (``registry.add(
"policy_loss", name, fn)`` in a plugin's ``register_components``) and chosen by
``algorithm.policy_loss``. :func:`alignkit.rl.policy_loss` calls it on each micro-batch and
adds what every loss shares: the mismatch-correction weights, the configured aggregation over
the minibatch's global counts (``algorithm.loss_agg``), the KL term when the KL is in the
loss, and the entropy bonus. Its signature (keyword arguments)::

    fn(logp, old_logp, advantages, mask, clip_eps, clip_eps_high) -> (per_token, clipfrac)

with ``logp`` (b, R) current log-probs (with grad), ``old_logp`` (b, R) the sampling policy's,
``advantages`` (b, R), ``mask`` (b, R), the clip range ``[1 - clip_eps, 1 + clip_eps_high]``
(``clip_eps_high`` already resolved); it returns the (b, R) loss (0 at padding) and the
scalar fraction of valid tokens whose gradient the clip removed. A sequence-level ratio
(GSPO) computes it per row and spreads it over the row's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from alignkit.rl.ops import clipped_policy_loss

PolicyLossFn = Callable[..., tuple[Tensor, Tensor]]
"""``fn(*, logp, old_logp, advantages, mask, clip_eps, clip_eps_high) -> (per_token,
clipfrac)``; see the module docstring."""

DEFAULT_POLICY_LOSS = "ppo_clip"


def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float,
) -> tuple[Tensor, Tensor]:
    """Token-level clipped surrogate (Schulman et al. 2017, eq. 7) with an asymmetric range
    (``clip_eps_high``, DAPO's clip-higher): :func:`alignkit.rl.ops.clipped_policy_loss`."""
    return clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps, clip_eps_high)


BUILTIN_POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": ppo_clip}
