"""Helpers every benchmark shares: arguments, peak memory, timers and the matmul ceiling."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WORKLOADS = ("generation", "grpo", "ppo", "reward_model")
"""Every workload the entry point knows, in the order it runs them."""


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Model size, batch, lengths, threads, steps: the options every workload reads."""
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary (upper bound)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    p.add_argument("--micro", type=int, default=16, help="rows per forward/backward in updates")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs per RM step")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run")
    p.add_argument(
        "--rm-steps", type=int, default=10, help="measured reward-model steps (cheaper steps)"
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--seed", type=int, default=0)
    return p


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass(frozen=True)
class MatmulShape:
    """One ``(rows x inner) @ (inner x out)`` product of the model, as a FLOP share."""

    name: str
    inner: int
    out: int
    count: int
    """How many times one forward runs it (layers x occurrences per block; 1 for the head)."""


# GPT-2's projections by their role (its attention and MLP both have a ``c_proj``).
_GPT2_ROLES = {"attn.c_attn": "qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_up"}
_GPT2_ROLES["mlp.c_proj"] = "mlp_down"


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a ``transformers`` decoder (GPT-2's ``h``, Llama's
    ``layers``, ...): the first ``ModuleList`` as long as the config's layer count."""
    layers = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise ValueError(f"no list of {layers} blocks in {type(model).__name__}")


def model_matmuls(model: nn.Module) -> list[MatmulShape]:
    """The per-token matrix multiplies of a decoder (read from one block's projections, any
    architecture: fused or separate Q/K/V, grouped-query K/V, gated or plain MLP) and its LM
    head. Projections of the same shape are timed once and counted for each."""
    from transformers.pytorch_utils import Conv1D

    blocks = decoder_blocks(model)
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, module in blocks[0].named_modules():
        if isinstance(module, nn.Linear):
            dims = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2's projections store (in, out) weights
            dims = (int(module.weight.shape[0]), int(module.weight.shape[1]))
        else:
            continue
        shapes.setdefault(dims, []).append(_GPT2_ROLES.get(name, name.rsplit(".", 1)[-1]))
    out = [
        MatmulShape("+".join(names), inner, width, len(blocks) * len(names))
        for (inner, width), names in shapes.items()
    ]
    head = model.get_output_embeddings()
    out.append(MatmulShape("lm_head", head.in_features, head.out_features, 1))
    return out


def matmul_ceiling(
    matmuls: list[MatmulShape], rows: int, min_seconds: float = 0.3
) -> dict[str, Any]:
    """Measured fp32 GFLOP/s of the model's own matmul shapes at ``rows`` tokens.

    Each shape is timed alone (repeated for at least ``min_seconds``); the ceiling is the
    FLOP-weighted harmonic mean over one forward's matmuls (total FLOPs / total time), i.e.
    the rate a forward pass would reach if it did nothing but its matrix multiplies.
    """
    per_shape: dict[str, float] = {}
    total_flops = total_seconds = 0.0
    for mm in matmuls:
        a, b = torch.randn(rows, mm.inner), torch.randn(mm.inner, mm.out)
        torch.matmul(a, b)  # warm-up: allocator and kernel selection
        flops = 2.0 * rows * mm.inner * mm.out
        count, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and count >= 3:
                break
        rate = flops * count / elapsed
        per_shape[f"{mm.name} [{rows}x{mm.inner}]@[{mm.inner}x{mm.out}]"] = rate / 1e9
        total_flops += mm.count * flops
        total_seconds += mm.count * flops / rate
    return {"gflops": total_flops / total_seconds / 1e9, "rows": rows, "per_shape": per_shape}


def write_json(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (parents created)."""
    from alignkit.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
