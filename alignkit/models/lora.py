"""Optional LoRA (Hu et al. 2021) for the policy, through the ``peft`` package.

LoRA freezes the base weights W and trains a low-rank update, ``W + (alpha / r) * B A``. In
RL that also makes the reference policy free: the reference is the base model, i.e. the same
module with its adapters switched off, so no second copy of the weights is kept
(:class:`AdapterDisabledReference`).

``peft`` is an optional dependency (``pip install 'alignkit[lora]'``), imported only when
these functions are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alignkit.errors import ConfigError
from alignkit.models import supports_logits_to_keep

__all__ = [
    "AdapterDisabledReference",
    "apply_lora",
    "is_lora_model",
    "lora_parameters",
    "lora_targets",
]


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ConfigError(
            "LoRA needs the optional 'peft' package: install the 'lora' extra "
            "(pip install 'alignkit[lora]')"
        ) from exc
    return peft


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> nn.Module:
    """Wrap a causal LM with LoRA adapters; only the adapter weights stay trainable.

    Args:
        model: a transformers causal LM.
        r: rank of the update ``B A``.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input. Keep 0 for RL: the PPO ratio compares two
            forwards of the same weights and dropout noise would move it away from 1.
        target_modules: module names (or a regex) to adapt; None lets ``peft`` pick the
            defaults of the architecture (e.g. ``c_attn`` for GPT-2).

    Returns:
        A ``peft`` model: same forward, base weights frozen, ``B`` initialised to 0 so the
        wrapped model starts out identical to ``model``.
    """
    peft = _peft()
    if r < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {r}")
    config = peft.LoraConfig(
        r=int(r),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(target_modules)
        if isinstance(target_modules, list | tuple)
        else target_modules,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def lora_targets(value: Any) -> list[str] | str | None:
    """``model.lora.target_modules`` as ``peft`` takes it: a list of names, a string (a regex
    or ``all-linear``), or None (the architecture's defaults)."""
    if value is None or isinstance(value, str):
        return value
    try:
        names = [str(v) for v in value]
    except TypeError:
        raise ConfigError(
            f"model.lora.target_modules must be a list of module names, a string or null, "
            f"got {value!r}"
        ) from None
    if not names:
        raise ConfigError("model.lora.target_modules is empty: name modules, or use all-linear")
    return names


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` carries ``peft`` adapters that can be disabled."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable (adapter) parameters of a LoRA model."""
    return [p for p in model.parameters() if p.requires_grad]


class AdapterDisabledReference(nn.Module):
    """The reference policy of a LoRA policy: the base model, without a second copy.

    ``forward`` runs the wrapped policy with its adapters disabled and without gradients,
    which is exactly the frozen base model. The policy is held by reference, not registered as
    a submodule, so the reference has no parameters of its own: freezing or moving it cannot
    touch the policy, and its ``state_dict`` is empty.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        if not is_lora_model(policy):
            raise ConfigError("AdapterDisabledReference needs a LoRA (peft) policy")
        self._policy = [policy]  # a list, so nn.Module does not register it
        self._keeps_logits = supports_logits_to_keep(policy.get_base_model())

    @property
    def policy(self) -> nn.Module:
        return self._policy[0]

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Same arguments and output as the base causal LM (``logits_to_keep`` if it has it)."""
        if logits_to_keep is not None and self._keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
