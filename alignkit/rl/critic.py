"""The value model (critic) of an algorithm that declares ``AlgorithmNeeds(critic=True)``.

The core builds it on first use (:func:`critic_state`), checkpoints it with the run (the core
plugin's checkpoint hooks write it into ``<checkpoint>/value_model``) and offers the pieces an
actor-critic algorithm combines:

* a linear head on the policy's last hidden state (``algorithm.value_model=shared``, trained
  with the policy) or a separate transformer with a scalar head (``separate``, its own
  optimizer; initialised from ``algorithm.value_model_path``, else from the reward model the
  pipeline trained, else from the policy's weights);
* :func:`rollout_values` (no grad, each rank its rows), :func:`policy_and_values` (log-probs,
  entropies and values of a micro-batch, with grad, one forward for a shared head),
  :func:`value_term` (the clipped value loss), and the one-forward critic step of
  :func:`accumulate_critic` / :func:`step_critic`.

``V_t`` is read at position P - 1 + t, the state *before* response token t is emitted, the
same position whose logits give log pi(y_t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.errors import ConfigError
from alignkit.models import (
    ScalarHeadModel,
    disable_dropout,
    float32_lm_head,
    pack_rollout,
    position_ids_from_mask,
    response_read,
    supports_logits_to_keep,
)
from alignkit.rewards.learned import member_folders
from alignkit.rl.ops import clipped_value_loss, entropy_from_logits, logprobs_from_logits
from alignkit.rl.optim import adamw
from alignkit.rl.update import (
    Counts,
    DataParallel,
    OptimTarget,
    gather_rows,
    policy_logprobs,
    policy_target,
    rank_rows,
    run_minibatch_updates,
    step_targets,
)

CRITIC_KEY = "core/critic"
"""``ctx.state`` key of the :class:`Critic` (not JSON-able: checkpointed by the core)."""
CRITIC_DIR = "value_model"
"""Checkpoint subfolder of the critic: weights and optimizer, written by the backend."""
LEGACY_CRITIC_DIRS = ("ppo_value",)
"""Where checkpoints of earlier versions kept the critic; read on resume."""


@dataclass
class CriticConfig:
    """Fields of an algorithm config that trains a critic (mix into its dataclass)."""

    value_model: str = "separate"
    """shared: a linear value head on the policy's last hidden state, trained with the policy;
    separate: a transformer with a scalar head and its own optimizer."""
    value_model_path: str | None = None
    """separate: folder to initialise the value model from; null: the reward model the
    pipeline trained (InstructGPT), else a copy of the policy's weights."""
    value_lr: float | None = None
    """Learning rate of the value parameters; null uses ``rl.optim.lr``."""
    vf_coef: float = 0.1
    value_clip: float = 0.2
    """Value clipping range, in reward units."""


@dataclass
class Critic:
    """The value model: a head on the policy (``shared``) or a :class:`ScalarHeadModel`."""

    kind: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lr: float
    pending: dict[str, float] | None = None
    """Metrics of gradients accumulated by :func:`accumulate_critic` and not yet stepped."""


def _hidden_size(policy: nn.Module) -> int:
    """Width of the policy's last hidden state (the LM head's input)."""
    head = policy.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return head.in_features
    return int(policy.get_input_embeddings().embedding_dim)


def _plain_copy(ctx: RunContext, policy: nn.Module) -> nn.Module:
    """A trainable copy of the policy's weights (LoRA adapters merged in, if any); the
    backend makes it (FSDP-sharded modules cannot be deep-copied, their weights are
    gathered instead)."""
    model = ctx.backend.full_copy(policy)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.requires_grad_(True)


def _init_path(ctx: RunContext) -> Path | str | None:
    """``algorithm.value_model_path``, else the pipeline's reward model (an ensemble's first
    member)."""
    path = ctx.cfg.algorithm.get("value_model_path") or ctx.artifacts.reward_model
    return member_folders(str(path))[0] if path else None


def build_critic(ctx: RunContext) -> Critic:
    """Create the critic and its optimizer from ``ctx.cfg.algorithm`` (:class:`CriticConfig`)."""
    algo, optim = ctx.cfg.algorithm, ctx.cfg.rl.optim
    assert ctx.policy is not None
    kind = str(algo.get("value_model", "separate"))
    if kind == "shared":
        size = _hidden_size(ctx.policy)
        module: nn.Module = nn.Linear(size, 1)
        # The reward-head initialisation of Ziegler et al. 2019: unit-scale outputs.
        nn.init.normal_(module.weight, std=1.0 / (size + 1) ** 0.5)
        nn.init.zeros_(module.bias)
    elif kind == "separate":
        path = _init_path(ctx)
        if path:
            module = ScalarHeadModel.from_pretrained(
                str(path),
                dtype=str(ctx.cfg.model.get("dtype", "float32")),
                trust_remote_code=bool(ctx.cfg.model.get("trust_remote_code", False)),
            )
        else:
            module = ScalarHeadModel(_plain_copy(ctx, ctx.policy))
    else:
        raise ConfigError(f"algorithm.value_model must be 'shared' or 'separate', got {kind!r}")
    disable_dropout(module)
    # Placed (and under FSDP sharded) before its optimizer sees the parameters.
    module = ctx.backend.prepare_model(module)
    lr = float(optim.lr) if algo.get("value_lr") is None else float(algo.value_lr)
    optimizer = adamw(
        module.parameters(),
        lr=lr,
        betas=tuple(optim.betas),
        eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
    )
    return Critic(kind, module, optimizer, lr)


def critic_state(ctx: RunContext) -> Critic:
    """The run's critic, created on first use (``run_start``, or a resume before it)."""
    critic = ctx.state.get(CRITIC_KEY)
    if critic is None:
        critic = ctx.state[CRITIC_KEY] = build_critic(ctx)
    return critic


def save_critic(ctx: RunContext, directory: Path) -> None:
    """Write the critic's weights and optimizer into ``directory/value_model`` (every rank
    that writes checkpoint files; under FSDP each writes its shards)."""
    critic = ctx.state.get(CRITIC_KEY)
    if critic is None:
        return
    out = directory / CRITIC_DIR
    out.mkdir(exist_ok=True)
    ctx.backend.save_model_state(out, critic.module, critic.optimizer)


def load_critic(ctx: RunContext, directory: Path) -> None:
    """Restore the critic from a checkpoint (before ``run_start``: it is created here)."""
    critic = critic_state(ctx)
    found = [d for d in (CRITIC_DIR, *LEGACY_CRITIC_DIRS) if (directory / d).is_dir()]
    if not found:
        raise ConfigError(
            f"checkpoint {directory} has no critic ({CRITIC_DIR}/); it was written by an "
            "algorithm without a value model"
        )
    ctx.backend.load_model_state(directory / found[0], critic.module, critic.optimizer)


# ---------------------------------------------------------------------------------------------
# forwards
# ---------------------------------------------------------------------------------------------


def _policy_forward(ctx: RunContext, seq: Tensor, seq_mask: Tensor, keep: int) -> Any:
    """The policy's output with hidden states; logits only for the last ``keep`` positions."""
    assert ctx.policy is not None
    kwargs = {"logits_to_keep": keep} if supports_logits_to_keep(ctx.policy) else {}
    return ctx.policy(
        input_ids=seq,
        attention_mask=seq_mask,
        position_ids=position_ids_from_mask(seq_mask),
        use_cache=False,
        output_hidden_states=True,
        **kwargs,
    )


def _head_values(head: nn.Module, hidden: Tensor) -> Tensor:
    """(b, R, H) hidden states -> (b, R) values, in the head's (float32) precision."""
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


def critic_values(critic: nn.Module, batch: Rollout, rows: Tensor) -> Tensor:
    """(b, R) raw values of a separate critic at positions P - 1 + t of ``batch[rows]``.

    A supported critic (:mod:`alignkit.models.lean`) runs packed, like the policy; any other runs
    its padded forward over the whole ``prompt | response`` rows.
    """
    p_ids, p_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
    r_mask = batch.response_mask[rows]
    packed = pack_rollout(p_ids, p_mask, batch.response_ids[rows], r_mask)
    if packed is not None and isinstance(critic, ScalarHeadModel):
        values = critic.values_packed(packed, response_read(packed, p_mask, r_mask))
        if values is not None:
            return values
    seq, seq_mask = batch.sequences()
    return critic(seq[rows], seq_mask[rows])[:, batch.prompt_ids.shape[1] - 1 : -1]


def policy_and_values(
    ctx: RunContext, batch: Rollout, rows: Tensor, critic: Critic
) -> tuple[Tensor, Tensor, Tensor]:
    """(b, R) log-probs, entropies and values of ``batch[rows]``, with grad (0 at padding).

    A shared head reads the hidden state of the same policy forward that gives the logits.
    """
    valid = batch.response_mask[rows] != 0
    if critic.kind == "separate":
        logp, entropy = policy_logprobs(ctx, batch, rows)
        values = critic_values(critic.module, batch, rows)
        return logp, entropy, torch.where(valid, values, 0.0)
    seq, seq_mask = batch.sequences()
    seq, seq_mask = seq[rows], seq_mask[rows]
    start, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    with float32_lm_head(ctx.policy):  # log-probs from unrounded logits under bf16 autocast
        out = _policy_forward(ctx, seq, seq_mask, keep=length + 1)
    temperature = float(ctx.cfg.rl.temperature)
    logits = out.logits[:, -(length + 1) : -1]
    logp = logprobs_from_logits(logits, seq[:, start:], temperature).masked_fill(~valid, 0.0)
    entropy = entropy_from_logits(logits, temperature).masked_fill(~valid, 0.0)
    values = _head_values(critic.module, out.hidden_states[-1][:, start - 1 : -1])
    return logp, entropy, torch.where(valid, values, 0.0)


@torch.no_grad()
def rollout_values(ctx: RunContext, batch: Rollout, critic: Critic, chunk: int) -> Tensor:
    """(B, R) values of the batch at rollout time (no grad), ``chunk`` rows per forward.

    Data parallel: each rank runs the critic on its share of the rows (:func:`rank_rows`)
    and the values are gathered.
    """
    seq, seq_mask = batch.sequences()
    start = batch.prompt_ids.shape[1]
    chunks = []
    for rows in rank_rows(ctx, batch.num_rows).split(chunk):
        if critic.kind == "separate":
            chunks.append(critic_values(critic.module, batch, rows))
        else:
            # shared: the head reads the policy's hidden states; one logit column suffices.
            out = _policy_forward(ctx, seq[rows], seq_mask[rows], keep=1)
            chunks.append(_head_values(critic.module, out.hidden_states[-1][:, start - 1 : -1]))
    values = gather_rows(ctx, torch.cat(chunks))
    return torch.where(batch.response_mask != 0, values, 0.0)


# ---------------------------------------------------------------------------------------------
# losses and steps
# ---------------------------------------------------------------------------------------------


def value_term(
    values: Tensor,
    old: Tensor,
    returns: Tensor,
    mask: Tensor,
    counts: Counts,
    clip: float,
    agg: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped value loss of a micro-batch, ``agg(0.5 * max((V - R)^2, (V_clip - R)^2))``
    over the minibatch's global counts, and its metrics (``loss/value``, ``value/clipfrac``).

    ``values`` (b, R) with grad, ``old`` (b, R) the values the clip range is centred on,
    ``returns`` (b, R) the targets, ``mask`` (b, R).
    """
    per_token, clipfrac = clipped_value_loss(values, old, returns, mask, clip)
    value_loss = counts.aggregate(per_token, mask, agg)
    metrics = {
        "loss/value": value_loss.detach(),
        "value/clipfrac": counts.share_of_mean(clipfrac, mask),
    }
    return value_loss, metrics


def follow_policy_schedule(ctx: RunContext, critic: Critic) -> None:
    """Scale the value learning rate by the policy schedule's current factor."""
    assert ctx.optimizer is not None
    base = float(ctx.cfg.rl.optim.lr)
    factor = ctx.optimizer.param_groups[0]["lr"] / base if base > 0 else 1.0
    for group in critic.optimizer.param_groups:
        group["lr"] = critic.base_lr * factor


def critic_target(ctx: RunContext, critic: Critic) -> OptimTarget:
    """The separate critic's parameters and optimizer, clipped like the policy."""
    params = list(critic.module.parameters())
    return OptimTarget("value", params, [critic.optimizer], policy_target(ctx).max_grad_norm)


ValueLoss = Callable[[Tensor, Tensor, Counts], tuple[Tensor, dict[str, Tensor], Tensor]]
"""``fn(rows, values, counts) -> (loss, metrics, returns)`` for a micro-batch whose values
(with grad) the critic just computed."""


def accumulate_critic(
    ctx: RunContext,
    batch: Rollout,
    critic: Critic,
    loss_fn: ValueLoss,
    *,
    minibatch_size: int,
    grad_accum_steps: int,
) -> Tensor:
    """The separate critic's forward over the whole batch, with its gradient accumulated and
    no step (:func:`step_critic` takes it in the update phase); returns the (B, R) values.

    For a critic that takes one optimizer step per batch: its weights do not change between
    the rollout and that step, so the forward that gives the rollout's values is the one it
    learns from (one critic forward fewer). ``loss_fn`` turns each micro-batch's values into
    its loss (it may derive the targets from the detached values, as GAE does).
    """
    values = torch.zeros_like(batch.response_mask, dtype=torch.float32)

    def micro_loss(rows: Tensor, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask[rows]
        v = torch.where(mask != 0, critic_values(critic.module, batch, rows), 0.0)
        values[rows] = v.detach().float()
        loss, metrics, _ = loss_fn(rows, v, counts)
        return loss, metrics

    critic.pending = run_minibatch_updates(
        micro_loss,
        batch.response_mask,
        [critic_target(ctx, critic)],
        epochs=1,
        minibatch_size=minibatch_size,
        grad_accum_steps=grad_accum_steps,
        max_len=int(ctx.cfg.rl.get("max_new_tokens", batch.response_mask.shape[1])),
        seed=int(ctx.cfg.get("seed", 0)) * 1_000_003 + int(ctx.step),
        parallel=DataParallel.of(ctx),
        step=False,
    )
    if ctx.backend.distributed:
        # Each rank filled the rows it trained on (every row once: one step, one epoch).
        values = ctx.backend.all_reduce(values, "sum")
    return values


def step_critic(ctx: RunContext, critic: Critic) -> dict[str, float]:
    """The optimizer step of gradients :func:`accumulate_critic` left; its metrics
    (``loss/value``, ``value/clipfrac``, ``value/grad_norm``, ``loss/total`` part)."""
    if critic.pending is None:
        return {}
    follow_policy_schedule(ctx, critic)
    metrics = {**critic.pending, **step_targets([critic_target(ctx, critic)])}
    critic.pending = None
    return metrics
