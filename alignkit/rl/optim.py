"""The optimizer every training loop uses: AdamW (Loshchilov & Hutter, 2019), fused when it can.

``torch.optim.AdamW`` defaults to its ``foreach`` implementation, a few vectorised kernels per
update step. The ``fused`` kernel does the whole update in one pass per parameter and computes
the same update to float rounding; on the built-in 3.4M-parameter model an optimizer step
takes about 3 ms fused against 12-15 ms foreach on one CPU thread, 6% of a reward-model
training step. It needs plain (not FSDP-sharded ``DTensor``) floating-point parameters on the
CPU or a CUDA device; anything else keeps the default.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["adamw", "can_fuse"]


def can_fuse(params: list[nn.Parameter]) -> bool:
    """Whether every parameter allows ``AdamW(fused=True)``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        DTensor = ()  # type: ignore[assignment,misc]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
        for p in params
    )


def adamw(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the parameters that require gradients, fused when possible."""
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        trainable,
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        eps=eps,
        weight_decay=weight_decay,
        fused=True if can_fuse(trainable) else None,
    )
