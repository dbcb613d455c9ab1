"""Checkpoints of the RL loop, written atomically.

Layout of ``<run_dir>/checkpoints``::

    step_000020/            one complete checkpoint (renamed into place only when complete)
      model.safetensors     policy weights (safetensors; shared tensors handled)
      optimizer.pt          optimizer and scheduler state (loaded with weights_only=True)
      rng.pt                torch CPU RNG and the sampling generator's state
      state.json            step, data position and JSON-able plugin state
      ...                   files plugins add through the ``save_checkpoint`` hook
    latest                  name of the newest complete checkpoint (written atomically)

A crash while writing leaves only a hidden temporary directory behind; ``latest`` still names
the previous complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from alignkit.context import RunContext
from alignkit.io import atomic_write_dir, atomic_write_text

LATEST = "latest"


def _split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Plugin state as (JSON-able part, tensor part); other values are not checkpointed."""
    plain, tensors = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            try:
                json.dumps(value)
            except TypeError:
                continue
            plain[key] = value
    return plain, tensors


def save_checkpoint(ctx: RunContext, step: int, extra: dict[str, Any]) -> Path:
    """Write ``step_<step>`` atomically, point ``latest`` at it, prune old ones."""
    root = ctx.run_dir / "checkpoints"
    name = f"step_{step:06d}"

    def fill(tmp: Path) -> None:
        assert ctx.policy is not None
        save_model(ctx.policy, str(tmp / "model.safetensors"))
        optim = {
            "optimizer": ctx.optimizer.state_dict() if ctx.optimizer else None,
            "scheduler": ctx.scheduler.state_dict() if ctx.scheduler else None,
        }
        torch.save(optim, tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if ctx.generator is not None:
            rng["generator"] = ctx.generator.get_state()
        torch.save(rng, tmp / "rng.pt")
        plain, tensors = _split_state(ctx.state)
        torch.save(tensors, tmp / "plugin_tensors.pt")
        meta = {"step": step, "plugin_state": plain, **extra}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        ctx.plugins.call("save_checkpoint", ctx=ctx, directory=tmp)

    if ctx.is_main_process:
        atomic_write_dir(root / name, fill)
        atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep=int(ctx.cfg.rl.keep_checkpoints), newest=name)
    return root / name


def _prune(root: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(ctx: RunContext, directory: Path) -> dict[str, Any]:
    """Restore policy, optimizer, scheduler, RNG and plugin state; return ``state.json``."""
    assert ctx.policy is not None
    load_model(ctx.policy, str(directory / "model.safetensors"), device=str(ctx.device))
    optim = torch.load(directory / "optimizer.pt", weights_only=True)
    if ctx.optimizer is not None and optim["optimizer"] is not None:
        ctx.optimizer.load_state_dict(optim["optimizer"])
    if ctx.scheduler is not None and optim["scheduler"] is not None:
        ctx.scheduler.load_state_dict(optim["scheduler"])
    rng = torch.load(directory / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if ctx.generator is not None and "generator" in rng:
        ctx.generator.set_state(rng["generator"])
    meta = json.loads((directory / "state.json").read_text())
    ctx.state.update(meta.get("plugin_state", {}))
    ctx.state.update(torch.load(directory / "plugin_tensors.pt", weights_only=True))
    ctx.plugins.call("load_checkpoint", ctx=ctx, directory=directory)
    return meta
