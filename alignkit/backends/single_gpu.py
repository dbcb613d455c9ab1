"""``backend=single_gpu``: one process on one CUDA device, bf16 autocast by default.

Weights and optimizer state stay fp32 (``model.dtype=float32``); forwards run under
``torch.autocast(dtype=bfloat16)``, which keeps matmuls in bf16 and reductions (softmax,
log-softmax, norms) in fp32. The LM head is the exception: wherever logits become log-probs
or sampling probabilities it runs in fp32 with autocast off
(:func:`alignkit.rl.ops.float32_linear`), so logits are not rounded to bf16. The sampling
generator lives on the GPU.
``backend.mixed_precision=fp32`` turns autocast off.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from alignkit.backends.base import Backend, env_int
from alignkit.errors import ConfigError


class SingleGPUBackend(Backend):
    name = "single_gpu"

    @property
    def device(self) -> torch.device:
        configured = str(self.cfg.get("device") or "cuda")
        device = torch.device(configured)
        if device.type == "cuda" and device.index is None:
            # Under a launcher that sets LOCAL_RANK, pick that GPU; else the first one.
            device = torch.device("cuda", env_int("LOCAL_RANK", 0))
        return device

    def setup(self) -> None:
        super().setup()
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "backend=single_gpu needs a CUDA device, but torch.cuda.is_available() is "
                    "False; use backend=cpu"
                )
            torch.cuda.set_device(self.device)

    def seed(self, seed: int) -> torch.Generator:
        generator = super().seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        return generator

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
