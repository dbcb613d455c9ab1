"""The backend interface: where models live, how they are wrapped, how ranks talk.

One code path serves every backend; a single device is the degenerate case of a process
group of size one. A backend owns

* the device and the process group (initialised from ``torchrun``'s environment),
* model preparation: device placement, gradient checkpointing, wrapping (FSDP2) and mixed
  precision (bf16 autocast or FSDP's ``MixedPrecisionPolicy`` on CUDA, fp32 on the CPU),
* collectives: ``all_reduce``, the mean of metrics across ranks, gathering objects, barriers,
* seeding (the sampling generator lives on the backend's device and has the same seed on
  every rank: each rank uses its own rows' draws of the global batch),
* the model/optimizer part of checkpoints (plain state dicts on one device, sharded
  ``torch.distributed.checkpoint`` under FSDP) and full weights for export.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from alignkit.errors import ConfigError

T = TypeVar("T")

__all__ = ["Backend", "shard_bounds"]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (n % world == 0)."""
    if n % world_size:
        raise ConfigError(f"{n} items cannot be split evenly over {world_size} ranks")
    per = n // world_size
    return rank * per, (rank + 1) * per


class Backend:
    """A single process on one device; subclasses add accelerators and process groups.

    Attributes:
        cfg: the ``backend`` config node (``name``, ``device``, ``threads``,
            ``mixed_precision``, ``gradient_checkpointing``).
        rank, world_size, local_rank: this process's place in the process group (0, 1, 0
            without one).
    """

    name = "cpu"
    sharded = False
    """True when parameters are sharded over ranks (checkpoints go through DCP)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return torch.device(str(self.cfg.get("device") or "cpu"))

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup(self) -> None:
        """Threads; subclasses also join the process group and pick the device."""
        threads = self.cfg.get("threads")
        if threads:
            torch.set_num_threads(int(threads))

    def teardown(self) -> None:
        """Leave the process group (no-op on one device)."""

    def seed(self, seed: int) -> torch.Generator:
        """Seed Python and torch with ``seed``; return the sampling generator.

        The global RNGs get the same seed on every rank so that models initialised from them
        (a fresh value head) agree. So does the sampling generator: every rank draws the
        numbers of the whole global batch and uses its own rows' (``generate(rows=...)``), so
        a run samples the same responses on any number of ranks. It lives on :attr:`device`,
        where sampling draws (a CPU generator cannot draw on a GPU); on the CPU it is the
        generator ``torch.Generator()`` gives, so CPU runs draw what they always drew.
        """
        random.seed(seed)
        torch.manual_seed(seed)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    # ------------------------------------------------------------------------------------------
    # models
    # ------------------------------------------------------------------------------------------

    @property
    def mixed_precision(self) -> str:
        """``bf16`` or ``fp32``: the configured value, ``auto`` meaning bf16 only on CUDA."""
        value = str(self.cfg.get("mixed_precision") or "auto")
        if value not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"backend.mixed_precision must be auto, bf16 or fp32, got {value!r}")
        if value == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        return value

    def prepare_model(self, model: nn.Module, *, trainable: bool = True) -> nn.Module:
        """Move ``model`` to the device; turn on gradient checkpointing when configured."""
        if trainable and bool(self.cfg.get("gradient_checkpointing", False)):
            _enable_checkpointing(model)
        return model.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast where configured (one accelerator); otherwise nothing."""
        return contextlib.nullcontext()

    def full_copy(self, model: nn.Module) -> nn.Module:
        """A plain, independent copy of ``model`` with its full weights, on every rank."""
        import copy

        return copy.deepcopy(model)

    def unwrap(self, model: nn.Module) -> nn.Module | None:
        """A plain module with the full weights on the main process (None on the others).

        On one device this is the model itself; FSDP gathers the shards.
        """
        return model

    # ------------------------------------------------------------------------------------------
    # collectives (identity on one process)
    # ------------------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``op`` (sum | mean | max | min) of ``tensor`` over ranks, in place; returns it."""
        return tensor

    def all_reduce_mean(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The mean of each metric over ranks (the same keys on every rank)."""
        return {k: float(v) for k, v in metrics.items()}

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (picklable objects only)."""
        return [obj]

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """``src``'s ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (``len(items)`` must divide evenly)."""
        start, stop = shard_bounds(len(items), self.rank, self.world_size)
        return list(items[start:stop])

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Run the block on the main process first (it builds files the others then read)."""
        if not self.is_main_process:
            self.barrier()
        yield
        if self.is_main_process:
            self.barrier()

    # ------------------------------------------------------------------------------------------
    # checkpoints: the model and optimizer part
    # ------------------------------------------------------------------------------------------

    def save_model_state(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Write weights (``model.safetensors``) and optimizer state (``optimizer.pt``).

        On one device only the main process calls this.
        """
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict() if optimizer else None},
            directory / "optimizer.pt",
        )

    def load_model_state(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Restore what :meth:`save_model_state` wrote, or a sharded (``backend=fsdp``)
        checkpoint's ``dcp/`` read back whole in this one process."""
        from safetensors.torch import load_model

        if not (directory / "model.safetensors").is_file() and (directory / "dcp").is_dir():
            self._load_sharded(directory / "dcp", model, optimizer)
            return
        load_model(model, str(directory / "model.safetensors"), device=str(self.device))
        state = torch.load(directory / "optimizer.pt", weights_only=True)
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])

    def _load_sharded(
        self, dcp_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """A ``torch.distributed.checkpoint`` state (any number of writer ranks) into a plain
        model and optimizer; read with the restricted loader of
        :mod:`alignkit.backends.safe_dcp`."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from alignkit.backends.safe_dcp import load_dcp_state

        optimizers = optimizer if optimizer is not None else []
        model_sd, optim_sd = get_state_dict(model, optimizers)
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optim_sd
        load_dcp_state(state, dcp_dir)
        set_state_dict(
            model,
            optimizers,
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", {}),
        )

    def rng_state(self, generator: torch.Generator | None) -> dict[str, Any]:
        """This rank's RNG states: torch (CPU and CUDA), Python and the sampling generator.

        Every state is a CPU byte tensor (a CUDA generator's ``get_state`` is one too), so
        the file loads with ``weights_only=True`` on any machine.
        """
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if generator is not None:
            state["generator"] = generator.get_state()
        return state

    def load_rng_state(self, state: Mapping[str, Any], generator: torch.Generator | None) -> None:
        torch.set_rng_state(state["torch"])
        if "python" in state:
            _set_python_rng(state["python"])
        if "cuda" in state and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        if generator is not None and "generator" in state:
            _set_generator_state(generator, state["generator"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}/{self.world_size}, device={self.device})"


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of every block, non-reentrant.

    Non-reentrant checkpointing composes with FSDP2 and works when the block inputs need no
    grad. transformers >= 5 calls it activation checkpointing; older versions lack that name.
    """
    names = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    if not any(hasattr(model, n) for n in names) and hasattr(model, "backbone"):
        model = model.backbone  # a ScalarHeadModel: its transformer does the checkpointing
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(
            f"backend.gradient_checkpointing: {type(model).__name__} does not support it"
        )


def _set_generator_state(generator: torch.Generator, saved: torch.Tensor) -> None:
    """Restore the sampling generator, unless ``saved`` is another device type's state.

    A CPU generator's state (Mersenne Twister, 5056 bytes) and a CUDA one's (Philox seed and
    offset, 16 bytes) cannot be loaded into each other. A run resumed on another kind of
    device could not repeat the same samples anyway (other kernels, other streams), so the
    freshly seeded generator is kept and that is said.
    """
    current = generator.get_state()
    if saved.shape != current.shape:
        warnings.warn(
            f"the checkpoint's sampling generator state ({saved.numel()} bytes) is not a "
            f"{generator.device.type} generator's ({current.numel()} bytes): it was saved on "
            "another kind of device; sampling continues from the generator seeded with "
            "`seed`, so the samples differ from an uninterrupted run",
            stacklevel=3,
        )
        return
    generator.set_state(saved)


def _python_rng() -> torch.Tensor:
    """Python's ``random`` state as a tensor (``torch.load(weights_only=True)`` takes tensors)."""
    version, internal, gauss = random.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)


def _set_python_rng(state: torch.Tensor) -> None:
    values = state.tolist()
    # The Gaussian cache is rarely set; it is dropped (random.gauss is not used for training).
    random.setstate((int(values[0]), tuple(int(v) for v in values[1:-1]), None))


def env_int(name: str, default: int) -> int:
    """An integer from the environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)
