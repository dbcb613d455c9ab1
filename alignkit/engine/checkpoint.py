"""Checkpoints of the RL loop, written atomically, on one device or sharded over ranks.

Layout of ``<run_dir>/checkpoints``::

    step_000020/            one complete checkpoint (renamed into place only when complete)
      model.safetensors     policy weights (one device; safetensors, shared tensors handled)
      optimizer.pt          optimizer state (one device; loaded with weights_only=True)
      dcp/                  policy and optimizer shards (backend=fsdp; torch.distributed.checkpoint)
      scheduler.pt          learning-rate schedule state
      rng.pt                RNG states: torch CPU (and CUDA), Python, the sampling generator
      rng_rank<r>.pt        the same per rank (backend=fsdp)
      state.json            step, data position, JSON-able plugin state (e.g. KL controller),
                            the run's config fingerprint and the last step's metrics
      plugin_tensors.pt     tensor-valued plugin state
      model_config/         the policy's HF config and tokenizer (no weights), for `alignkit
                            export`; with LoRA also lora/adapter_config.json. Checkpoints
                            written before the rename call it hf/, which is still read
      ...                   files plugins add through the ``save_checkpoint`` hook
    latest                  name of the newest complete checkpoint (written atomically)

Every checkpoint is first written into a hidden temporary directory next to its final name
and renamed into place by the main process once every rank has finished writing; ``latest``
is updated only after that rename. A crash at any moment therefore leaves the previous
complete checkpoint (and ``latest`` naming it) untouched; leftover temporary directories are
removed at the next save.

A checkpoint is written only from finite parameters (``alignkit.engine.guards``): a NaN policy is
never saved, and so never makes the pruning delete a good checkpoint. A failed write (disk
full, read-only folder) raises :class:`CheckpointWriteError` naming the checkpoint and the
cause, and leaves the previous checkpoint in place.

``state.json`` also holds the run's *fingerprint* (:func:`run_fingerprint`): the config
values that define the trajectory. A resume compares it with the new config
(:func:`fingerprint_changes`) and refuses to mix two different runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.engine.guards import check_finite_parameters
from alignkit.io import WriteError, atomic_directory, atomic_write_text, write_error

LATEST = "latest"
MODEL_CONFIG_DIR = "model_config"
"""Config and tokenizer of the policy, without weights: named so that nothing takes it for a
loadable HF model folder."""
LEGACY_HF_DIR = "hf"
"""The same folder in checkpoints written before the rename; read, never written."""
HF_DIR = LEGACY_HF_DIR
"""Old name of :data:`LEGACY_HF_DIR`, kept for code that reads old checkpoints by it."""
LORA_DIR = "lora"
"""Subfolder of :data:`MODEL_CONFIG_DIR` with a LoRA policy's ``adapter_config.json``."""

FINGERPRINT_KEYS = (
    "policy",
    "model",
    "algorithm",
    "reward",
    "task",
    "seed",
    "rl.prompts_per_step",
    "rl.samples_per_prompt",
    "rl.max_new_tokens",
    "rl.temperature",
    "rl.top_k",
    "rl.top_p",
    "rl.kl_coef",
    "rl.kl_estimator",
    "rl.optim",
    "rollout.name",
    "rollout.correction",
)
"""Config keys that define an RL run's trajectory, compared on resume. Left out on purpose:
``rl.steps`` (extending a run is what resume is for), checkpoint/logging cadence, the backend
(a resume on another number of ranks is supported) and the logger. ``policy`` is the folder
the policy started from (``model.path``, or the pipeline's SFT folder)."""
FINGERPRINT_DEFAULTS = {"rollout.name": "native", "rollout.correction": "auto"}
"""Values of fingerprint keys that checkpoints of earlier versions did not record."""


class CheckpointWriteError(WriteError):
    """Writing a checkpoint failed; the previous complete checkpoint is kept."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}", out)
    else:
        out[prefix] = value


def _portable(value: Any, run_dir: str) -> Any:
    # Paths inside the run directory are stored relative to it: a moved run still matches.
    if isinstance(value, str) and run_dir and value.startswith(run_dir):
        return "<run_dir>" + value[len(run_dir) :]
    if isinstance(value, list | tuple):
        return [_portable(v, run_dir) for v in value]
    return value


def run_fingerprint(cfg: Any, policy_path: str | Path | None, run_dir: Path) -> dict[str, Any]:
    """The values of :data:`FINGERPRINT_KEYS` as ``{dotted.key: JSON value}``."""
    from omegaconf import OmegaConf

    root = str(Path(run_dir).resolve())
    flat: dict[str, Any] = {}
    for key in FINGERPRINT_KEYS:
        if key == "policy":
            value: Any = str(Path(policy_path).resolve()) if policy_path else None
        else:
            value = OmegaConf.select(cfg, key, default=None)
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
        _flatten(value, key, flat)
    return {k: _portable(v, root) for k, v in flat.items()}


def fingerprint_changes(
    saved: dict[str, Any], current: dict[str, Any], allowed: list[str]
) -> tuple[list[str], list[str]]:
    """(refused, allowed) descriptions ``key: old -> new`` of the keys that differ.

    ``allowed`` holds keys or key prefixes (``reward`` covers ``reward.gold.weight``); ``*``
    allows every change.
    """
    refused, accepted = [], []
    for key in sorted(set(saved) | set(current)):
        # A key added after the checkpoint was written had its default then.
        old, new = saved.get(key, FINGERPRINT_DEFAULTS.get(key)), current.get(key)
        if old == new:
            continue
        line = f"{key}: {old!r} -> {new!r}"
        ok = any(a == "*" or key == a or key.startswith(f"{a}.") for a in allowed)
        (accepted if ok else refused).append(line)
    return refused, accepted


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` (step, data position, fingerprint, last metrics)."""
    return json.loads((Path(directory) / "state.json").read_text())


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


def _rng_file(ctx: RunContext) -> str:
    return f"rng_rank{ctx.backend.rank}.pt" if ctx.backend.sharded else "rng.pt"


def _rng_to_load(ctx: RunContext, directory: Path) -> Path | None:
    """This rank's RNG file, or, resumed on another number of ranks or another backend,
    rank 0's (or the single-device one): every rank seeds and draws alike (the sampling
    generator draws the global batch's numbers on every rank), so any rank's state is every
    rank's, and the resumed run samples what the uninterrupted one would."""
    for name in (_rng_file(ctx), "rng_rank0.pt", "rng.pt"):
        if (directory / name).is_file():
            return directory / name
    return None


def _write_shared(ctx: RunContext, tmp: Path, step: int, extra: dict[str, Any]) -> None:
    """The main process's part: schedule, step and plugin state, HF config, plugin files."""
    torch.save(
        {"scheduler": ctx.scheduler.state_dict() if ctx.scheduler else None},
        tmp / "scheduler.pt",
    )
    plain, tensors = _split_state(ctx.state)
    torch.save(tensors, tmp / "plugin_tensors.pt")
    meta = {"step": step, "world_size": ctx.backend.world_size, "plugin_state": plain, **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    write_model_config(ctx.policy, ctx.tokenizer, tmp / MODEL_CONFIG_DIR)


def write_model_config(policy: Any, tokenizer: Any, out: Path) -> bool:
    """Config and tokenizer of ``policy`` into ``out``, so that a checkpoint exports on its own.

    A LoRA (peft) policy gets its base model's config plus ``lora/adapter_config.json``: the
    checkpoint's weights are the adapted model's, which export rebuilds and merges. Returns
    False (nothing written) for a model without a transformers config.
    """
    from alignkit.models.lora import is_lora_model

    lora = is_lora_model(policy)
    model = policy.get_base_model() if lora else policy
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return False
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if lora:
        policy.peft_config[policy.active_adapter].save_pretrained(out / LORA_DIR)
    return True


def model_config_dir(checkpoint: Path) -> Path | None:
    """The checkpoint's config folder: ``model_config/``, or an old checkpoint's ``hf/``."""
    for name in (MODEL_CONFIG_DIR, LEGACY_HF_DIR):
        if (Path(checkpoint) / name / "config.json").is_file():
            return Path(checkpoint) / name
    return None


def save_checkpoint(ctx: RunContext, step: int, extra: dict[str, Any]) -> Path:
    """Write ``step_<step>`` atomically, point ``latest`` at it, prune old ones.

    Collective under a sharded backend: every rank must call it. Raises
    :class:`~alignkit.engine.guards.NonFiniteError` (nothing written, nothing pruned) when a
    parameter is NaN/Inf, and :class:`CheckpointWriteError` when the write fails.
    """
    assert ctx.policy is not None
    backend = ctx.backend
    root = ctx.run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    check_finite_parameters(ctx.policy, f"checkpoint {final}", step, backend)

    def write_rank_files(tmp: Path) -> None:
        # Under FSDP every rank writes its shards; on one device only the main process runs.
        backend.save_model_state(tmp, ctx.policy, ctx.optimizer)
        torch.save(backend.rng_state(ctx.generator), tmp / _rng_file(ctx))
        # Plugins may hold sharded modules too (a PPO critic): they write on the same ranks.
        ctx.plugins.call("save_checkpoint", ctx=ctx, directory=tmp)

    if ctx.is_main_process:
        try:
            with atomic_directory(final) as tmp:
                if backend.sharded:
                    backend.broadcast_object(str(tmp))
                write_rank_files(tmp)
                backend.barrier()  # every rank's files are complete before the rename
                _write_shared(ctx, tmp, step, extra)
            atomic_write_text(root / LATEST, final.name + "\n")
        except (OSError, RuntimeError, WriteError) as exc:
            # torch.save reports a full disk as a RuntimeError ("basic_ios::clear: iostream
            # error", "file write failed"): one line naming the checkpoint and the cause.
            raise _checkpoint_error(final, root, exc) from exc
        _prune(root, keep=int(ctx.cfg.rl.keep_checkpoints), newest=final.name)
    elif backend.sharded:
        tmp = Path(backend.broadcast_object(""))
        write_rank_files(tmp)
        backend.barrier()
    backend.barrier()  # no rank runs ahead of a checkpoint that is not yet in place
    return final


def _checkpoint_error(final: Path, root: Path, exc: BaseException) -> CheckpointWriteError:
    cause = exc.__cause__ if isinstance(exc, WriteError) and exc.__cause__ else exc
    kept = latest_checkpoint(root.parent)
    note = f"; the previous checkpoint {kept.name} is kept" if kept is not None else ""
    return CheckpointWriteError(f"{write_error(final, cause, 'checkpoint')}{note}")


def _prune(root: Path, keep: int, newest: str) -> None:
    """Keep the newest ``keep`` checkpoints; remove temporary directories of crashed saves."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(ctx: RunContext, directory: Path) -> dict[str, Any]:
    """Restore policy, optimizer, scheduler, RNG and plugin state; return ``state.json``.

    Collective under a sharded backend: every rank must call it.
    """
    assert ctx.policy is not None
    backend = ctx.backend
    backend.load_model_state(directory, ctx.policy, ctx.optimizer)
    scheduler_state = _scheduler_state(directory)
    if ctx.scheduler is not None and scheduler_state is not None:
        ctx.scheduler.load_state_dict(scheduler_state)
    meta = json.loads((directory / "state.json").read_text())
    rng_path = _rng_to_load(ctx, directory)
    if rng_path is not None:
        backend.load_rng_state(torch.load(rng_path, weights_only=True), ctx.generator)
    else:
        from alignkit.tracking import console

        console.print(f"[yellow]{directory.name}: no RNG state file; sampling RNG starts fresh[/]")
    ctx.state.update(meta.get("plugin_state", {}))
    ctx.state.update(torch.load(directory / "plugin_tensors.pt", weights_only=True))
    ctx.plugins.call("load_checkpoint", ctx=ctx, directory=directory)
    return meta


def _scheduler_state(directory: Path) -> dict[str, Any] | None:
    if (directory / "scheduler.pt").is_file():
        return torch.load(directory / "scheduler.pt", weights_only=True)["scheduler"]
    # Checkpoints written before the scheduler had its own file kept it with the optimizer.
    legacy = torch.load(directory / "optimizer.pt", weights_only=True)
    return legacy.get("scheduler")
