"""The RL math and update machinery that algorithm plugins build on.

* :mod:`alignkit.rl.ops` - pure tensor math (masked statistics, log-probs, KL estimators,
  GAE, group baselines, clipped losses, aggregation);
* :mod:`alignkit.rl.advantages` - the advantage-estimator registry and the (KL-shaped)
  rewards estimators start from;
* :mod:`alignkit.rl.losses` - the policy-loss registry;
* :mod:`alignkit.rl.update` - the minibatch update loop (epochs x minibatches x gradient
  accumulation, data parallel), the policy's log-probs and the policy-gradient loss;
* :mod:`alignkit.rl.preference` - the preference-loss registry and the pairwise update of
  the DPO family;
* :mod:`alignkit.rl.kl_control` - fixed and adaptive KL coefficients.

``docs/plugin-api.md`` documents the names exported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignkit.rl.advantages import (
        AdvantageFn,
        estimate_advantages,
        kl_coef_in_reward,
        sequence_rewards,
        token_rewards,
    )
    from alignkit.rl.losses import BUILTIN_POLICY_LOSSES, PolicyLossFn, ppo_clip
    from alignkit.rl.preference import (
        PreferenceConfig,
        PreferenceLoss,
        best_worst_rows,
        pair_batch,
        pair_scores,
        preference_update,
        resolve_preference_loss,
    )
    from alignkit.rl.update import (
        Counts,
        OptimTarget,
        PolicyGradientConfig,
        PolicyLossSpec,
        gather_rows,
        policy_gradient_update,
        policy_logprobs,
        policy_loss,
        policy_target,
        rank_rows,
        run_update,
        step_metrics,
    )

_EXPORTS = {
    "advantages": (
        "AdvantageFn",
        "estimate_advantages",
        "kl_coef_in_reward",
        "sequence_rewards",
        "token_rewards",
    ),
    "losses": ("BUILTIN_POLICY_LOSSES", "PolicyLossFn", "ppo_clip"),
    "preference": (
        "PreferenceConfig",
        "PreferenceLoss",
        "best_worst_rows",
        "pair_batch",
        "pair_scores",
        "preference_update",
        "resolve_preference_loss",
    ),
    "update": (
        "Counts",
        "OptimTarget",
        "PolicyGradientConfig",
        "PolicyLossSpec",
        "gather_rows",
        "policy_gradient_update",
        "policy_logprobs",
        "policy_loss",
        "policy_target",
        "rank_rows",
        "run_update",
        "step_metrics",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "BUILTIN_POLICY_LOSSES",
    "AdvantageFn",
    "Counts",
    "OptimTarget",
    "PolicyGradientConfig",
    "PolicyLossFn",
    "PolicyLossSpec",
    "PreferenceConfig",
    "PreferenceLoss",
    "best_worst_rows",
    "estimate_advantages",
    "gather_rows",
    "kl_coef_in_reward",
    "pair_batch",
    "pair_scores",
    "policy_gradient_update",
    "policy_logprobs",
    "policy_loss",
    "policy_target",
    "ppo_clip",
    "preference_update",
    "rank_rows",
    "register_builtins",
    "resolve_preference_loss",
    "run_update",
    "sequence_rewards",
    "step_metrics",
    "token_rewards",
]


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): the model layer imports alignkit.rl.ops, and the update
    # machinery imports the model layer, so this package must not import both eagerly.
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"alignkit.rl.{module}"), name)


def register_builtins(registry: Any) -> None:
    """Register the built-in policy losses (the core plugin calls this)."""
    from alignkit.rl.losses import BUILTIN_POLICY_LOSSES

    for name, fn in BUILTIN_POLICY_LOSSES.items():
        registry.add("policy_loss", name, fn)
