"""The run context handed to every lifecycle and phase hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignkit.backends.base import Backend
from alignkit.backends.cpu import CPUBackend

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from alignkit.plugins import PluginManager
    from alignkit.registry import ComponentRegistry
    from alignkit.tracking import Tracker


@dataclass
class RunContext:
    """What a plugin may use: models, tokenizer, task, config, tracker and its own state.

    Plugins never import the engine; everything they need arrives here. ``rank`` and
    ``world_size`` mirror the backend's process group (0 and 1 on one device). ``state`` is a dict
    for plugin-owned values (a KL controller's coefficient, a value head); JSON-able values and
    tensors in it are saved in checkpoints and restored on resume.
    """

    cfg: DictConfig
    run_dir: Path
    plugins: PluginManager
    registry: ComponentRegistry
    tracker: Tracker
    task: Any = None
    policy: torch.nn.Module | None = None
    """The causal LM being trained (a transformers ``PreTrainedModel``)."""
    tokenizer: Any = None
    ref_policy: torch.nn.Module | None = None
    """Frozen reference policy for the KL term; None when ``rl.kl_coef == 0``."""
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: torch.Generator | None = None
    """Seeded generator for sampling, so runs are reproducible and resumable. It lives on
    :attr:`device` (draw with ``device=ctx.device``) and has the same state on every rank:
    :func:`alignkit.generation.generate` takes each rank's rows of the global batch's draws."""
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    backend: Backend = field(default_factory=lambda: CPUBackend({"name": "cpu", "device": "cpu"}))
    """Device placement, collectives and checkpoint I/O (:mod:`alignkit.backends`). Under
    ``backend=fsdp`` ``ctx.backend.all_reduce`` gives plugins the sum/mean over ranks."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def stage_dir(self, name: str) -> Path:
        """``<run_dir>/<name>``, created on first use."""
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
