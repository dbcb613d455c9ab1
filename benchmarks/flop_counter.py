"""Counts the analytic FLOPs of every forward a benchmark runs, by model and by grad mode.

Forward hooks on each decoder trunk (the base model of any architecture: ``GPT2Model``,
``LlamaModel``, ...) and LM head read the real shapes of every call: rows, new tokens, keys
attended over (the attention mask's length, which includes a KV cache) and the positions that
reach the LM head. A forward run with gradients enabled is counted as a training pass
(forward plus a backward of twice its cost, :func:`alignkit.models.flops.train_flops`), since every
such forward in these workloads is back-propagated. The same hooks work on alignkit's and
TRL's models, so both sides' FLOP rates come from one definition.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from alignkit.models import lean
from alignkit.models.flops import DecoderShape, forward_flops


def is_trunk(module: nn.Module) -> bool:
    """A ``transformers`` base model (``GPT2Model``, ``LlamaModel``, ...): its own base model,
    where a model with a head (``*ForCausalLM``, ``*ForSequenceClassification``) holds one."""
    return isinstance(module, PreTrainedModel) and module.base_model is module


class FlopCounter:
    """``counter.attach(model, "policy")``, run, then read ``counter.flops[("policy", grad)]``."""

    def __init__(self) -> None:
        self.flops: dict[tuple[str, bool], float] = defaultdict(float)
        self._handles: list[Any] = []
        # alignkit's lean forwards skip module hooks and report each call's FLOPs to the
        # observers instead, naming the trunk that ran: id(trunk) -> model name.
        self._lean: dict[int, str] = {}
        lean.call_observers.append(self._lean_call)

    def attach(self, model: nn.Module | None, name: str) -> FlopCounter:
        """Hook every decoder trunk and the output embedding of ``model`` under ``name``."""
        if model is None:
            return self
        for module in model.modules():
            if is_trunk(module):
                shape = DecoderShape.from_config(module.config)
                hook = lean.observe_only(self._trunk_hook(name, shape))
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                self._lean[id(module)] = name
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if isinstance(head, nn.Linear):
            hook = lean.observe_only(self._head_hook(name))
            self._handles.append(head.register_forward_pre_hook(hook))
        return self

    def _lean_call(self, trunk: nn.Module, flops: float) -> None:
        name = self._lean.get(id(trunk))
        if name is not None:
            self._add(name, flops)

    def _add(self, name: str, flops: float) -> None:
        grad = torch.is_grad_enabled()
        self.flops[(name, grad)] += 3.0 * flops if grad else flops

    def _trunk_hook(self, name: str, shape: DecoderShape) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs["inputs_embeds"][..., 0]
            rows, new = ids.shape[0], ids.shape[1]
            mask = kwargs.get("attention_mask")
            keys = mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else new
            self._add(name, forward_flops(shape, rows, new, 0, context=keys))

        return hook

    def _head_hook(self, name: str) -> Any:
        def hook(module: nn.Linear, args: tuple[Any, ...]) -> None:
            x = args[0]
            positions = x.numel() // x.shape[-1]
            self._add(name, 2.0 * module.in_features * module.out_features * positions)

        return hook

    def total(self, name: str | None = None, grad: bool | None = None) -> float:
        """FLOPs summed over the models named ``name`` and grad mode ``grad`` (None: all)."""
        return sum(
            v
            for (n, g), v in self.flops.items()
            if (name is None or n == name) and (grad is None or g == grad)
        )

    def reset(self) -> None:
        self.flops.clear()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._lean.clear()
        if self._lean_call in lean.call_observers:
            lean.call_observers.remove(self._lean_call)
