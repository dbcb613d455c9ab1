"""``stage=rl``: online RL of a policy with the active algorithm and reward plugins.

The stage holds the run directory's lock (``alignkit.engine.run_lock``) while it runs, refuses a
resume under a config that defines another run, never saves a non-finite policy, and merges
its numbers into an existing ``summary.json`` rather than replacing it: a resumed run with
nothing left to do keeps (or rebuilds from its checkpoint) the finished run's summary.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.engine import Engine
from alignkit.engine.checkpoint import _portable, run_fingerprint
from alignkit.engine.guards import check_finite_parameters
from alignkit.engine.run_lock import run_guard
from alignkit.errors import ConfigError
from alignkit.io import WriteError, write_error
from alignkit.models import disable_dropout
from alignkit.models.lora import AdapterDisabledReference, apply_lora, is_lora_model, lora_targets
from alignkit.needs import Artifacts
from alignkit.rl.optim import adamw
from alignkit.stages.common import linear_warmup_decay, load_model, train_prompts
from alignkit.stages.select import Snapshots, select_policy
from alignkit.stages.sft import save_policy
from alignkit.tracking import console


def make_reference(policy: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference: the base with adapters disabled (LoRA), else a frozen copy."""
    if is_lora_model(policy):
        return AdapterDisabledReference(policy)
    return frozen_copy(policy)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference policy: an eval-mode copy with gradients off."""
    return freeze(copy.deepcopy(model))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with gradients off (in place)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def switch_off_dropout(policy: torch.nn.Module, lora_dropout: float = 0.0) -> None:
    """Set every dropout rate of ``policy`` to 0, LoRA's adapter dropout included; say so
    when one was not 0.

    Every algorithm's update compares log-probs of the rollout's tokens with those recorded
    at sampling time (the ratio ``pi / pi_old``, or the on-policy gradient): the policy
    trains in train mode, where dropout noise would move the first minibatch's ratio away
    from 1 with unchanged weights. ``load_causal_lm`` already zeroes the base model's rates;
    ``model.lora.dropout`` adds ``nn.Dropout`` modules after it.
    """
    # _DropoutNd is the base of every torch dropout module (peft's lora_dropout is one).
    dropouts = [m for m in policy.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    active = sorted({float(m.p) for m in dropouts if m.p > 0})
    disable_dropout(policy)
    if active:
        source = f"model.lora.dropout={lora_dropout:g}" if lora_dropout > 0 else "the model"
        console.print(
            f"RL: dropout {', '.join(f'{p:g}' for p in active)} ({source}) switched off: "
            "the update's log-probs must match the rollout's"
        )


def setup_rl(
    ctx: RunContext,
    policy_path: str | Path,
    artifacts: Artifacts | None = None,
    reference_path: str | Path | None = None,
) -> RunContext:
    """A context for ``<run_dir>/rl`` with policy, reference, optimizer and scheduler, and the
    ``artifacts`` of the pipeline's earlier stages.

    A reference policy exists when ``rl.kl_coef > 0`` or the algorithm declares it needs one:
    the start policy, or the policy at ``reference_path`` when given (a later round of
    ``pipeline.rounds`` starts from the last round's policy but keeps the SFT reference).
    """
    rl, backend = ctx.cfg.rl, ctx.backend
    lora = ctx.cfg.model.lora
    if int(lora.r) > 0 and backend.sharded:
        raise ConfigError(
            f"model.lora.r={lora.r} with backend={backend.name}: LoRA adapters are not sharded; "
            "use backend=single_gpu (LoRA already keeps the trained state small)"
        )
    policy, tokenizer = load_model(ctx, policy_path)
    policy.train()
    if int(lora.r) > 0:
        policy = apply_lora(
            policy,
            r=int(lora.r),
            alpha=float(lora.alpha),
            dropout=float(lora.dropout),
            target_modules=lora_targets(lora.target_modules),
        )
    # Before the reference is copied from it, and whatever the algorithm.
    switch_off_dropout(policy, float(lora.dropout) if int(lora.r) > 0 else 0.0)
    needs = ctx.needs
    use_ref = (float(rl.kl_coef) > 0 and needs.kl_in != "none") or needs.reference
    if use_ref and reference_path is not None and str(reference_path) != str(policy_path):
        ref = backend.prepare_model(freeze(load_model(ctx, reference_path)[0]), trainable=False)
        policy = backend.prepare_model(policy)
    elif backend.sharded:
        # Shard the policy first, then load the reference afresh and shard it: at most one
        # full unsharded copy exists at a time (a deep copy would need two).
        policy = backend.prepare_model(policy)
        ref = None
        if use_ref:
            ref = backend.prepare_model(freeze(load_model(ctx, policy_path)[0]), trainable=False)
    else:
        ref = make_reference(policy) if use_ref else None
        if ref is not None and not is_lora_model(policy):
            ref = backend.prepare_model(ref, trainable=False)
        policy = backend.prepare_model(policy)
    # The optimizer is built last: FSDP replaces the parameters with sharded ones.
    o = rl.optim
    optimizer = adamw(
        policy.parameters(),
        lr=float(o.lr),
        betas=tuple(o.betas),
        eps=float(o.eps),
        weight_decay=float(o.weight_decay),
    )
    scheduler = linear_warmup_decay(optimizer, 0, int(rl.steps))
    return dataclasses.replace(
        ctx,
        run_dir=ctx.stage_dir("rl"),
        policy=policy,
        tokenizer=tokenizer,
        ref_policy=ref,
        optimizer=optimizer,
        scheduler=scheduler,
        artifacts=artifacts or ctx.artifacts,
    )


def effective_fingerprint(
    rl_ctx: RunContext, policy_path: str | Path, run_dir: Path
) -> dict[str, Any]:
    """The run's fingerprint with what the run resolves rather than what the config says: the
    KL estimator in use, and the trained reward model that a learned reward (or a critic)
    scores (or starts) with when its path is unset. A checkpoint of an earlier version, which
    wrote the trained paths into the config, then resumes as the same run."""
    cfg = rl_ctx.cfg
    fingerprint = run_fingerprint(cfg, policy_path, run_dir)
    fingerprint["rl.kl_estimator"] = rl_ctx.kl_estimator
    trained = rl_ctx.artifacts.reward_model
    if trained is None:
        return fingerprint
    path = _portable(str(Path(trained).resolve()), str(Path(run_dir).resolve()))
    learned = set(rl_ctx.registry.names("learned_reward"))
    for name, node in (cfg.get("reward") or {}).items():
        if str(name) not in learned or node is None:
            continue
        if "paths" in node and not node.paths:
            fingerprint[f"reward.{name}.paths"] = [path]
        elif "path" in node and not node.path:
            fingerprint[f"reward.{name}.path"] = path
    algo = cfg.get("algorithm") or {}
    if "value_model_path" in algo and not algo.value_model_path:
        fingerprint["algorithm.value_model_path"] = path
    return fingerprint


def previous_summary(run_dir: Path) -> dict[str, Any]:
    """The run's existing ``summary.json`` without its ``stage`` (empty if none/unreadable)."""
    try:
        old = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in old.items() if k != "stage"} if isinstance(old, dict) else {}


def _has_policy(out: Path) -> bool:
    return (out / "config.json").is_file()


def start_snapshots(rl_ctx: RunContext) -> Snapshots | None:
    """``rl.select_every > 0``: the start policy kept, for :func:`select_policy` (None
    otherwise)."""
    every = int(rl_ctx.cfg.rl.get("select_every", 0))
    if every <= 0:
        return None
    if rl_ctx.backend.sharded:
        raise ConfigError(
            "rl.select_every keeps whole copies of the policy: not under a sharded backend"
        )
    snapshots = Snapshots(every)
    snapshots.take(0, rl_ctx.policy)  # the start (a resumed run restores its checkpoint later)
    return snapshots


def save_final_policy(rl_ctx: RunContext, step: int) -> Path:
    """``<run_dir>/rl/policy`` from the trained policy: finite, atomic, errors named."""
    policy = rl_ctx.policy
    check_finite_parameters(policy, "the final policy", step, rl_ctx.backend)
    if is_lora_model(policy):
        # Export a plain HF folder: adapters merged into a copy, the training model untouched.
        policy = copy.deepcopy(policy).merge_and_unload()
    # Under FSDP the shards are gathered into a plain model on rank 0 (None elsewhere).
    plain = rl_ctx.backend.unwrap(policy)
    out = rl_ctx.run_dir / "policy"
    if plain is not None:
        try:
            save_policy(rl_ctx, plain, rl_ctx.tokenizer, out)
        except WriteError:
            raise
        except (OSError, RuntimeError) as exc:  # e.g. safetensors on a full disk
            raise write_error(out, exc, "the policy") from exc
    rl_ctx.backend.barrier()
    console.print(f"RL policy saved to {out}")
    return out


def close_rollout_engine(ctx: RunContext) -> None:
    """Close the run's rollout engine if it holds anything (:mod:`alignkit.rollout`)."""
    from alignkit.rollout import ENGINE_STATE_KEY

    engine = ctx.state.pop(ENGINE_STATE_KEY, None)
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def run_rl(
    ctx: RunContext,
    policy_path: str | Path | None = None,
    artifacts: Artifacts | None = None,
    reference_path: str | Path | None = None,
) -> tuple[dict[str, Any], RunContext]:
    """Train with the engine, save ``<run_dir>/rl/policy``; return the summary and context.

    The summary is the run's previous ``summary.json`` updated with this run's numbers.
    ``reference_path``: the KL reference when it is not the start policy (:func:`setup_rl`).
    """
    path = policy_path or ctx.cfg.model.path
    if not path:
        raise ConfigError(
            "stage=rl needs model.path: the policy to start from (e.g. an SFT folder)"
        )
    with run_guard(ctx):
        rl_ctx = setup_rl(ctx, path, artifacts, reference_path)
        fingerprint = effective_fingerprint(rl_ctx, path, ctx.run_dir)
        if reference_path is not None:
            root = str(Path(ctx.run_dir).resolve())
            fingerprint["reference"] = _portable(str(Path(reference_path).resolve()), root)
        snapshots = start_snapshots(rl_ctx)
        on_step = None
        if snapshots is not None:

            def on_step(done: int, last: bool) -> None:
                snapshots.after_step(done, rl_ctx.policy, last)

        engine = Engine(rl_ctx, train_prompts(rl_ctx), fingerprint=fingerprint, on_step=on_step)
        try:
            last = engine.run()
        finally:
            # A rollout engine holding resources (a vLLM server process, GPU memory) goes
            # with the run, also when it fails.
            close_rollout_engine(rl_ctx)
        ran = engine.start_step < int(ctx.cfg.rl.steps)
        if ran and snapshots is not None:
            from alignkit.stages.feedback import build_annotator

            selected = select_policy(rl_ctx, snapshots, build_annotator(rl_ctx))
            rl_ctx.tracker.log(selected, step=int(ctx.cfg.rl.steps), stage="rl")
            last = {**last, **selected}
        if ran or not _has_policy(rl_ctx.run_dir / "policy"):
            # Also when nothing ran but the policy folder is missing: a kill during the
            # final save left the final checkpoint, which the engine loaded.
            save_final_policy(rl_ctx, max(engine.start_step, int(ctx.cfg.rl.steps)))
        summary = {
            **previous_summary(ctx.run_dir),
            **{f"rl_final/{k}": v for k, v in last.items() if not k.startswith("time/")},
        }
        rl_ctx.plugins.call("run_end", ctx=rl_ctx, summary=summary)
    return summary, rl_ctx
