"""The model layer: Hugging Face causal LMs and scalar heads, and what runs them fast.

* :mod:`alignkit.models.hf` - loading (``from_pretrained``, local or hub), log-probs of
  responses, the scalar-head model (reward models, critics), tiny models built from configs;
* :mod:`alignkit.models.generation` - batched sampling with a KV cache;
* :mod:`alignkit.models.lean` - optional fast paths for common architectures (the model's own
  maths from its own weights), :mod:`alignkit.models.packing` - packed forwards;
* :mod:`alignkit.models.lora` - LoRA adapters and the adapter-disabled reference;
* :mod:`alignkit.models.tiny` - tiny models of every supported architecture;
* :mod:`alignkit.models.flops` - FLOP counts of a decoder's forwards.

``alignkit.models`` keeps the names it had when it was one module.
"""

from __future__ import annotations

from typing import Any

from alignkit.models import hf as _hf
from alignkit.models.hf import *  # noqa: F403 - the former single module's public names

__all__ = list(_hf.__all__)


def __getattr__(name: str) -> Any:
    # Any other name of the former single module (PEP 562).
    return getattr(_hf, name)
