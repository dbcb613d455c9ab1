"""The policy's full weights under their Hugging Face names, one tensor at a time: what an
inference engine loads to follow the trainer.

* LoRA (``peft``): each adapted layer's weight is the base weight plus its adapters' delta
  (``W + scale * B A``), computed without touching the trained model, under the base model's
  names; the adapter tensors themselves are not sent.
* FSDP: each sharded tensor is gathered when the iterator reaches it (a collective: every
  rank iterates in the same order), so a rank holds one full tensor besides its shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["policy_weights", "weights_blob"]


def _full(t: Tensor) -> Tensor:
    """A plain tensor: an FSDP ``DTensor`` gathered in full, anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_deltas(base: nn.Module) -> dict[str, Tensor]:
    """``{"<layer>.weight": delta}`` of every LoRA-adapted layer's active adapters."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue
        for adapter in module.active_adapters:
            # Linear layers keep adapters in lora_A, embeddings in lora_embedding_A.
            if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
                continue
            delta = module.get_delta_weight(adapter).detach()
            key = f"{name}.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    return deltas


@torch.no_grad()
def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of every weight of ``model`` as its plain Hugging Face model names
    it, LoRA adapters merged in, each gathered in full (see the module docstring)."""
    if hasattr(model, "get_base_model"):  # peft
        base = model.get_base_model()
        deltas = _lora_deltas(base)
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue
            clean = name.replace(".base_layer.", ".")
            value = _full(tensor)
            if clean in deltas:
                value = value + deltas[clean].to(value.dtype)
            yield clean, value
        return
    for name, tensor in model.state_dict().items():
        yield name, _full(tensor).detach()


def weights_blob(weights: Iterator[tuple[str, Tensor]]) -> bytes:
    """The weights as one safetensors file in memory (CPU tensors; tied ones copied apart,
    which safetensors requires), to send to an engine in another process."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").clone().contiguous() for name, t in weights}
    return save(tensors)
