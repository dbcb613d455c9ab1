"""Resuming a sharded checkpoint runs no code stored in it: the DCP metadata goes through the
restricted unpickler, and non-tensor items (optimizer param groups) through
``torch.load(weights_only=True)``. Run in one process, where DCP reads without a process
group, as ``alignkit export`` does."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from alignkit.backends.fsdp import DCP_DIR, FSDPBackend
from alignkit.errors import ConfigError


class _RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1), betas=(0.9, 0.95))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _backend() -> FSDPBackend:
    return FSDPBackend({"name": "fsdp", "device": "cpu", "mixed_precision": "fp32"})


def test_a_saved_sharded_state_loads_back_with_its_param_groups(tmp_path: Path) -> None:
    backend = _backend()
    model, optimizer = _model_and_optimizer(0)
    backend.save_model_state(tmp_path, model, optimizer)
    other, other_opt = _model_and_optimizer(1)
    backend.load_model_state(tmp_path, other, other_opt)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert other_opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert other_opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_crafted_metadata_is_refused_before_anything_runs(tmp_path: Path) -> None:
    backend = _backend()
    model, optimizer = _model_and_optimizer(0)
    backend.save_model_state(tmp_path, model, optimizer)
    marker = tmp_path / "ran"
    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))
    with pytest.raises(ConfigError, match=r"\.metadata: refusing"):
        backend.load_model_state(tmp_path, *_model_and_optimizer(1))
    assert not marker.exists()


def test_a_param_group_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """A bytes item (how DCP stores param groups) holding a callable is refused by the
    weights-only loader; torch.load(weights_only=False) would have run it."""
    backend = _backend()
    model, optimizer = _model_and_optimizer(0)
    backend.save_model_state(tmp_path, model, optimizer)
    marker = tmp_path / "ran"
    # Overwrite the checkpoint with one whose non-tensor item is a crafted object.
    state = {"model": model.state_dict(), "extra": _RunsCode(f"touch {marker}")}
    (tmp_path / DCP_DIR).rename(tmp_path / "old")
    dcp.save(state, checkpoint_id=tmp_path / DCP_DIR)
    target = {"model": model.state_dict(), "extra": None}
    from alignkit.backends.safe_dcp import load_dcp_state

    with pytest.raises(ConfigError, match="'extra' holds objects a checkpoint should not"):
        load_dcp_state(target, tmp_path / DCP_DIR)
    assert not marker.exists()
