"""``backend=fsdp``: data-parallel ranks with parameters sharded by PyTorch's FSDP2.

Launched with ``torchrun`` (``--standalone`` on one machine, a rendezvous endpoint across
machines); the process group is NCCL on GPUs and gloo on the CPU. :meth:`prepare_model`
applies ``fully_shard`` to every transformer block and then to the root (the ordering
torchtitan's ``parallelize`` uses: blocks first, so each block's parameters are gathered only
around its own forward/backward, and the root last, so it owns what is left: embeddings,
final norm, the (tied) LM head). On CUDA parameters compute in bf16 with fp32 gradient
reduction (``MixedPrecisionPolicy``); on the CPU everything stays fp32. Log-probs and
sampling logits still come from an fp32 product of the (bf16) final hidden states and head
weights (:func:`alignkit.models.float32_lm_head`), not from bf16 logits. Each rank's
sampling generator lives on its own device.

Checkpoints are sharded: every rank writes its shards with ``torch.distributed.checkpoint``
(DCP), so no rank ever holds the full model or optimizer state.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from alignkit.backends.base import Backend, env_int
from alignkit.backends.safe_dcp import load_dcp_state
from alignkit.errors import ConfigError

T = TypeVar("T")

DCP_DIR = "dcp"
"""Sub-directory of a checkpoint holding the DCP shards of model and optimizer."""

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one.

    Hugging Face models name them in ``_no_split_modules`` (``GPT2Block``,
    ``LlamaDecoderLayer``...); otherwise the children of the longest ``nn.ModuleList``.
    """
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class FSDPBackend(Backend):
    name = "fsdp"
    sharded = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.rank = env_int("RANK", 0)
        self.world_size = env_int("WORLD_SIZE", 1)
        self.local_rank = env_int("LOCAL_RANK", 0)
        self._owns_group = False

    @property
    def device(self) -> torch.device:
        configured = str(self.cfg.get("device") or "auto")
        if configured == "auto":
            configured = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(configured)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device

    def setup(self) -> None:
        super().setup()
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("backend.device=cuda but no CUDA device is available")
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {}
            if "MASTER_ADDR" not in os.environ:
                # `alignkit backend=fsdp` without torchrun: a group of one, no rendezvous.
                kwargs["store"] = dist.HashStore()
            dist.init_process_group(
                backend="nccl" if self.device.type == "cuda" else "gloo",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=float(self.cfg.get("timeout_s") or 1800)),
                **kwargs,
            )
            self._owns_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def teardown(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def seed(self, seed: int) -> torch.Generator:
        generator = super().seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        return generator

    # ------------------------------------------------------------------------------------------
    # models
    # ------------------------------------------------------------------------------------------

    def prepare_model(self, model: nn.Module, *, trainable: bool = True) -> nn.Module:
        """Place, optionally checkpoint activations, then ``fully_shard`` blocks and root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = super().prepare_model(model, trainable=trainable)
        kwargs: dict[str, Any] = {}
        if self.mixed_precision == "bf16":
            # Compute in bf16, reduce gradients in fp32: bf16 sums of many ranks lose bits.
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def full_copy(self, model: nn.Module) -> nn.Module:
        """Gather the full weights on every rank into a plain copy on this rank's device.

        FSDP modules cannot be deep-copied; this is the way to start a second model (e.g. a
        critic) from the policy's current weights. Collective.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = plain_copy(model)
        plain.load_state_dict(full)
        return plain.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module | None:
        """Gather the full weights into a plain copy on rank 0 (CPU); None elsewhere."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_main_process:
            return None
        plain = plain_copy(model)
        plain.load_state_dict(full)
        return plain

    # ------------------------------------------------------------------------------------------
    # collectives
    # ------------------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor.div_(self.world_size)
        if op not in _OPS:
            raise ValueError(f"unknown reduction {op!r}; expected sum, mean, max or min")
        dist.all_reduce(tensor, op=_OPS[op])
        return tensor

    def all_reduce_mean(self, metrics: Mapping[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        values = self.all_reduce(values.to(self._collective_device()), "mean").cpu()
        return dict(zip(keys, values.tolist(), strict=True))

    def all_gather_object(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------

    def save_model_state(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Every rank writes its shards of model and optimizer into ``directory/dcp``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optim_sd
        dcp.save(state, checkpoint_id=directory / DCP_DIR)

    def load_model_state(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Read this rank's shards back (DCP reshards when the world size changed); nothing in
        the checkpoint is unpickled beyond plain data (:mod:`alignkit.backends.safe_dcp`)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (directory / DCP_DIR).is_dir():
            raise ConfigError(
                f"checkpoint {directory} has no sharded state ({DCP_DIR}/): it was written by a "
                "single-device backend; resume it with that backend, or export it and start "
                "from the exported folder"
            )
        optimizers = optimizer if optimizer is not None else []
        model_sd, optim_sd = get_state_dict(model, optimizers)
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optim_sd
        # A checkpoint from elsewhere must not run code: its metadata is read with a restricted
        # unpickler and its non-tensor items (optimizer param groups) with weights_only=True.
        load_dcp_state(state, directory / DCP_DIR)
        set_state_dict(
            model,
            optimizers,
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", {}),
        )


def plain_copy(model: nn.Module) -> nn.Module:
    """A fresh, unsharded module of ``model``'s architecture (weights to be loaded)."""
    # Building a module initialises weights from the global RNG; that must not advance it
    # on rank 0 alone, or the ranks' RNG streams would part.
    with torch.random.fork_rng(devices=[]):
        return _build_like(model)


def _build_like(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"cannot rebuild {type(model).__name__}: it has no HF config")
    from alignkit.models import ScalarHeadModel

    if isinstance(model, ScalarHeadModel):
        from transformers import AutoModel

        with torch.device("cpu"):
            return ScalarHeadModel(AutoModel.from_config(config))
    from transformers import AutoModelForCausalLM

    with torch.device("cpu"):
        plain = AutoModelForCausalLM.from_config(config)
    return plain.to(next(iter(model.state_dict().values())).dtype)
