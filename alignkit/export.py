"""``alignkit export CHECKPOINT OUT``: an RL checkpoint as a plain Hugging Face folder.

Works for every backend's checkpoints in a single process with no process group: a
single-device checkpoint holds ``model.safetensors``; an FSDP checkpoint holds the sharded
``dcp/`` directory, which :func:`torch.distributed.checkpoint.load` reads into an unsharded
model (DCP reshards on load). Either way the checkpoint's ``hf/`` folder gives the
architecture and tokenizer. The output is written atomically and loads with
``AutoModelForCausalLM.from_pretrained``.

Usage::

    alignkit export outputs/.../rl/checkpoints/step_000050 exported/
    alignkit export outputs/.../rl/checkpoints exported/     # the checkpoint named by `latest`
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from alignkit.backends.fsdp import DCP_DIR
from alignkit.checkpoint import HF_DIR, LATEST
from alignkit.errors import AlignkitError, ConfigError
from alignkit.io import atomic_directory

__all__ = ["export_checkpoint", "load_checkpoint_model", "main"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the one a ``checkpoints/latest`` pointer names."""
    path = Path(path).expanduser()
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "state.json").is_file():
        raise ConfigError(f"{path} is not a complete alignkit checkpoint (no state.json)")
    if not (path / HF_DIR / "config.json").is_file():
        raise ConfigError(
            f"{path} has no {HF_DIR}/config.json: it predates export support or holds LoRA "
            "adapters; use the run's rl/policy folder instead"
        )
    return path


def load_checkpoint_model(path: str | Path) -> torch.nn.Module:
    """The policy of a checkpoint as a plain (unsharded) causal LM on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_checkpoint(path)
    config = AutoConfig.from_pretrained(path / HF_DIR)
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten; keep the RNG
        model = AutoModelForCausalLM.from_config(config)
    if (path / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        # Without a process group DCP reads every shard into these full tensors in place
        # (and warns that it assumes one process, which is the intent here).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path / DCP_DIR)
        model.load_state_dict(state["model"])
    elif (path / "model.safetensors").is_file():
        from safetensors.torch import load_model

        load_model(model, str(path / "model.safetensors"))
    else:
        raise ConfigError(f"{path} holds neither model.safetensors nor {DCP_DIR}/")
    return model.eval()


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's policy and tokenizer to ``out`` (safetensors, atomically)."""
    from transformers import AutoTokenizer

    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint_model(path)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if (path / HF_DIR / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(path / HF_DIR).save_pretrained(tmp)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alignkit export", description="Export an RL checkpoint to a plain HF folder."
    )
    parser.add_argument("checkpoint", help="a step_* directory, or a checkpoints/ directory")
    parser.add_argument("out", help="the HF folder to write")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except AlignkitError as exc:
        print(f"alignkit: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0
