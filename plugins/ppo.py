"""``algorithm=ppo``: PPO with a learned critic, as in InstructGPT (Ouyang et al. 2022) and
"The N implementation details of RLHF with PPO" (Huang et al. 2024).

Each response token is an action. The reward is the sequence score on the last response
token and a KL penalty to the reference on every token (Ziegler et al. 2019, eq. 2)::

    r_t = [t == last] * r(x, y) - beta * KL_t(pi || ref)          (KL_t: rl.kl_estimator)

with beta from a fixed or adaptive controller (:mod:`alignkit.kl_control`). A value model
``V`` (a linear head on the policy's last hidden state, or a separate transformer) gives GAE
advantages (Schulman et al. 2016, eq. 16; gamma = 1, lambda configurable), whitened over the
valid tokens of the batch. The loss minimised over ``ppo_epochs`` passes of minibatches::

    L = agg( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) )                 Schulman 2017, eq. 7
        + vf_coef * agg( 0.5 * max((V - R)^2, (V_clip - R)^2) )            clipped value loss
        - entropy_coef * agg(H)

with ``rho = pi / pi_old``; ``pi_old`` is the sampling policy, whose log-probs the rollout
recorded (no second forward pass). With ``kl_in_loss`` the KL leaves the reward and becomes a
``beta * agg(KL)`` term of the loss instead.

A separate critic that takes one optimizer step per batch learns in the advantage phase from
the forward that gives the rollout's values (``value_forward_once``, :func:`train_critic`):
``V_old = V`` there, so the value term is the same and the update trains the policy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from torch import Tensor, nn

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import AlgorithmConfig, store_algorithm
from alignkit.errors import ConfigError
from alignkit.kl_control import KLController, kl_controller_from_state, save_kl_controller
from alignkit.models import (
    ScalarHeadModel,
    disable_dropout,
    float32_lm_head,
    pack_rollout,
    position_ids_from_mask,
    response_read,
    supports_logits_to_keep,
)
from alignkit.ops import (
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_whiten,
    per_token_rewards,
    whiten_advantages,
)
from alignkit.optim import adamw
from alignkit.training import (
    Counts,
    OptimTarget,
    PolicyLossSpec,
    gather_rows,
    policy_logprobs,
    policy_loss,
    policy_target,
    rank_rows,
    reference_kl,
    rl_step_metrics,
    run_update,
)

VALUE_KEY = "ppo/value"
"""``ctx.state`` key of the :class:`ValueState` (not JSON-able: saved by this plugin's hooks)."""
VALUE_DIR = "ppo_value"
"""Checkpoint subfolder of the critic: weights and optimizer, written by the backend."""
CRITIC_STEPPED = "ppo/critic_metrics"
"""``batch.extras`` key: the critic's step metrics when it was trained in the advantage phase
(:func:`train_critic`); the update then trains the policy alone."""


@dataclass
class PPOConfig(AlgorithmConfig):
    name: str = "ppo"
    value_model: str = "separate"
    """shared: a linear value head on the policy's last hidden state, trained with the policy;
    separate: a transformer with a scalar head and its own optimizer."""
    value_model_path: str | None = None
    """separate: folder to initialise the value model from (e.g. a reward model); null copies
    the policy's weights at the start of RL."""
    value_lr: float | None = None
    """Learning rate of the value parameters; null uses ``rl.optim.lr``."""
    vf_coef: float = 0.1
    value_clip: float = 0.2
    """Value clipping range, in reward units."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance (mean kept) before GAE."""
    whiten_advantages: bool = True
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    """Upper clip range; null uses ``clip_eps``."""
    entropy_coef: float = 0.0
    kl_in_loss: bool = False
    """Put the KL to the reference in the loss instead of the reward."""
    kl_ctl: str = "fixed"
    """fixed | adaptive (Ziegler et al. 2019); starts at ``rl.kl_coef``."""
    kl_target: float = 6.0
    """adaptive: target KL per sequence, in nats."""
    kl_horizon: int = 10_000
    """adaptive: horizon, in samples."""
    loss_agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm."""
    ppo_epochs: int = 2
    """Passes over each batch (2 keeps the CPU budget; 4 is the common GPU default)."""
    minibatch_size: int = 32
    """Rows per forward/backward."""
    grad_accum_steps: int = 1
    """Forward/backward passes per optimizer step."""
    value_forward_once: bool = True
    """A separate critic that takes one optimizer step per batch (``ppo_epochs=1`` and
    ``minibatch_size * grad_accum_steps`` >= the batch) is trained in the advantage phase, on
    the forward that gives the rollout's values. Its weights do not change between the
    rollout and its step, so the update's forward would recompute those values (``V_old =
    V``): the step is the same, to float rounding, with one critic forward fewer. false
    keeps the separate no-grad forward."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "ppo", PPOConfig)


# ---------------------------------------------------------------------------------------------
# the value model
# ---------------------------------------------------------------------------------------------


@dataclass
class ValueState:
    """The critic: a head on the policy (``shared``) or a :class:`ScalarHeadModel`."""

    kind: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lr: float


def _hidden_size(policy: nn.Module) -> int:
    """Width of the policy's last hidden state (the LM head's input)."""
    head = policy.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return head.in_features
    return int(policy.get_input_embeddings().embedding_dim)


def _plain_copy(ctx: RunContext, policy: nn.Module) -> nn.Module:
    """A trainable copy of the policy's weights (LoRA adapters merged in, if any).

    The backend makes the copy: FSDP-sharded modules cannot be deep-copied, their full
    weights are gathered instead.
    """
    model = ctx.backend.full_copy(policy)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.requires_grad_(True)


def build_value_state(ctx: RunContext) -> ValueState:
    """Create the critic and its optimizer from ``ctx.cfg.algorithm``."""
    algo, optim = ctx.cfg.algorithm, ctx.cfg.rl.optim
    assert ctx.policy is not None
    if algo.value_model == "shared":
        size = _hidden_size(ctx.policy)
        module: nn.Module = nn.Linear(size, 1)
        # The reward-head initialisation of Ziegler et al. 2019: unit-scale outputs.
        nn.init.normal_(module.weight, std=1.0 / (size + 1) ** 0.5)
        nn.init.zeros_(module.bias)
    elif algo.value_model == "separate":
        if algo.value_model_path:
            module = ScalarHeadModel.from_pretrained(
                str(algo.value_model_path),
                dtype=str(ctx.cfg.model.get("dtype", "float32")),
                trust_remote_code=bool(ctx.cfg.model.get("trust_remote_code", False)),
            )
        else:
            module = ScalarHeadModel(_plain_copy(ctx, ctx.policy))
    else:
        raise ConfigError(
            f"algorithm.value_model must be 'shared' or 'separate', got {algo.value_model!r}"
        )
    disable_dropout(module)
    # Placed (and under FSDP sharded) before its optimizer sees the parameters.
    module = ctx.backend.prepare_model(module)
    lr = float(optim.lr) if algo.value_lr is None else float(algo.value_lr)
    optimizer = adamw(
        module.parameters(),
        lr=lr,
        betas=tuple(optim.betas),
        eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
    )
    return ValueState(str(algo.value_model), module, optimizer, lr)


def value_state(ctx: RunContext) -> ValueState:
    """The run's critic, created on first use (``run_start``, or a resume before it)."""
    state = ctx.state.get(VALUE_KEY)
    if state is None:
        state = ctx.state[VALUE_KEY] = build_value_state(ctx)
    return state


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


def _critic_values(critic: nn.Module, batch: Rollout, rows: Tensor) -> Tensor:
    """(b, R) raw values of a separate critic at positions P - 1 + t of ``batch[rows]``.

    A supported critic (:mod:`alignkit.lean`) runs packed, like the policy
    (:func:`alignkit.models.pack_rollout`); any other runs its padded forward over the whole
    ``prompt | response`` rows.
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


def _forward(
    ctx: RunContext, batch: Rollout, rows: Tensor, critic: ValueState
) -> tuple[Tensor, Tensor, Tensor]:
    """(b, R) log-probs, entropies and values of ``batch[rows]``, with grad.

    ``V_t`` is read at position P - 1 + t, the state *before* response token t is emitted,
    the same position whose logits give log pi(y_t).
    """
    valid = batch.response_mask[rows] != 0
    if critic.kind == "separate":
        logp, entropy = policy_logprobs(ctx, batch, rows)
        values = _critic_values(critic.module, batch, rows)
        return logp, entropy, torch.where(valid, values, 0.0)
    # shared: one policy forward gives the logits and the last hidden state.
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
def rollout_values(ctx: RunContext, batch: Rollout, critic: ValueState) -> Tensor:
    """(B, R) values of the batch at rollout time (no grad), in minibatch-sized chunks.

    Data parallel: each rank runs the critic on its share of the rows (:func:`rank_rows`)
    and the values are gathered.
    """
    seq, seq_mask = batch.sequences()
    start = batch.prompt_ids.shape[1]
    chunks = []
    for rows in rank_rows(ctx, batch.num_rows).split(int(ctx.cfg.algorithm.minibatch_size)):
        if critic.kind == "separate":
            chunks.append(_critic_values(critic.module, batch, rows))
        else:
            # shared: the head reads the policy's hidden states; one logit column suffices.
            out = _policy_forward(ctx, seq[rows], seq_mask[rows], keep=1)
            chunks.append(_head_values(critic.module, out.hidden_states[-1][:, start - 1 : -1]))
    values = gather_rows(ctx, torch.cat(chunks))
    return torch.where(batch.response_mask != 0, values, 0.0)


def kl_controller(ctx: RunContext) -> KLController:
    """The KL controller, restored from ``ctx.state`` (so checkpoints carry beta)."""
    algo = ctx.cfg.algorithm
    return kl_controller_from_state(
        ctx.state,
        str(algo.kl_ctl),
        float(ctx.cfg.rl.kl_coef),
        target=float(algo.kl_target),
        horizon=int(algo.kl_horizon),
    )


# ---------------------------------------------------------------------------------------------
# lifecycle hooks
# ---------------------------------------------------------------------------------------------


@hookimpl
def run_start(ctx: RunContext) -> None:
    assert ctx.policy is not None
    # Identical forwards must give identical log-probs and values (the ratio is 1 on-policy).
    disable_dropout(ctx.policy)
    value_state(ctx)
    save_kl_controller(ctx.state, kl_controller(ctx))


@hookimpl
def save_checkpoint(ctx: RunContext, directory: Path) -> None:
    critic = ctx.state.get(VALUE_KEY)
    if critic is None:
        return
    # Called on every rank that writes checkpoint files; under FSDP each writes its shards.
    out = directory / VALUE_DIR
    out.mkdir(exist_ok=True)
    ctx.backend.save_model_state(out, critic.module, critic.optimizer)


@hookimpl
def load_checkpoint(ctx: RunContext, directory: Path) -> None:
    # Called before run_start, so the critic is created here to receive its weights.
    critic = value_state(ctx)
    if not (directory / VALUE_DIR).is_dir():
        raise ConfigError(
            f"checkpoint {directory} has no PPO critic ({VALUE_DIR}/); "
            "it was not written by algorithm=ppo"
        )
    ctx.backend.load_model_state(directory / VALUE_DIR, critic.module, critic.optimizer)


# ---------------------------------------------------------------------------------------------
# phase hooks
# ---------------------------------------------------------------------------------------------


def value_term(
    values: Tensor,
    old: Tensor,
    returns: Tensor,
    mask: Tensor,
    counts: Counts,
    clip: float,
    algo: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped value loss of a micro-batch, ``agg(0.5 * max((V - R)^2, (V_clip - R)^2))``
    over the minibatch's global counts, and its metrics (``loss/value``, ``value/clipfrac``).

    ``values`` (b, R) with grad, ``old`` (b, R) the values the clip range is centred on,
    ``returns`` (b, R) the targets, ``mask`` (b, R).
    """
    per_token, clipfrac = clipped_value_loss(values, old, returns, mask, clip)
    value_loss = counts.aggregate(per_token, mask, str(algo.loss_agg))
    metrics = {
        "loss/value": value_loss.detach(),
        "value/clipfrac": counts.share_of_mean(clipfrac, mask),
    }
    return value_loss, metrics


def _critic_steps_once(ctx: RunContext, batch: Rollout, critic: ValueState) -> bool:
    """Whether this batch trains the separate critic in a single optimizer step (see
    ``value_forward_once``), so its rollout forward can be the one it learns from."""
    algo = ctx.cfg.algorithm
    rows_per_step = int(algo.minibatch_size) * int(algo.grad_accum_steps)
    return (
        critic.kind == "separate"
        and bool(algo.get("value_forward_once", True))
        and int(algo.ppo_epochs) == 1
        and batch.num_rows <= rows_per_step
    )


def train_critic(
    ctx: RunContext, batch: Rollout, critic: ValueState, rewards: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """One optimizer step of the separate critic on ``batch``; returns its (B, R) values.

    Each micro-batch's forward (with grad) gives ``V``; GAE of that row's ``rewards`` (B, R)
    and ``V.detach()`` gives the returns ``R``, and the loss is the update's value term,
    ``vf_coef * agg(0.5 * max((V - R)^2, (V_clip - R)^2))`` with ``V_old = V`` (the update
    would recompute the same values). Clipping, aggregation over global counts, gradient
    clipping and the learning rate are the update's. Metrics: ``loss/value``,
    ``value/clipfrac``, ``value/grad_norm`` and the value term's part of ``loss/total``.
    """
    algo, mask = ctx.cfg.algorithm, batch.response_mask
    gamma, lam = float(algo.gamma), float(algo.lam)
    clip, vf_coef = float(algo.value_clip), float(algo.vf_coef)
    values = torch.zeros_like(mask, dtype=torch.float32)

    def loss_fn(rows: Tensor, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
        row_mask = mask[rows]
        v = torch.where(row_mask != 0, _critic_values(critic.module, batch, rows), 0.0)
        old = v.detach()
        values[rows] = old.float()
        _, returns = gae(rewards[rows], old, row_mask, gamma, lam)
        value_loss, metrics = value_term(v, old, returns, row_mask, counts, clip, algo)
        return vf_coef * value_loss, metrics

    _follow_policy_schedule(ctx, critic)
    max_norm = policy_target(ctx).max_grad_norm  # the update clips the critic alike
    target = OptimTarget("value", list(critic.module.parameters()), [critic.optimizer], max_norm)
    metrics = run_update(
        ctx,
        batch,
        loss_fn,
        epochs=1,
        minibatch_size=int(algo.minibatch_size),
        grad_accum_steps=int(algo.grad_accum_steps),
        targets=[target],
        step_schedule=False,
    )
    if ctx.backend.distributed:
        # Each rank filled the rows it trained on (every row once: one step, one epoch).
        values = ctx.backend.all_reduce(values, "sum")
    keys = ("loss/total", "loss/value", "value/clipfrac", "value/grad_norm")
    return values, {k: metrics[k] for k in keys}


@hookimpl
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    assert batch.rewards is not None
    algo, mask = ctx.cfg.algorithm, batch.response_mask
    beta = kl_controller(ctx).coef
    critic = value_state(ctx)
    kl = reference_kl(batch, str(ctx.cfg.rl.kl_estimator))
    rewards = per_token_rewards(batch.rewards, kl, mask, 0.0 if algo.kl_in_loss else beta)
    if algo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if _critic_steps_once(ctx, batch, critic):
        values, batch.extras[CRITIC_STEPPED] = train_critic(ctx, batch, critic, rewards)
    else:
        values = rollout_values(ctx, batch, critic)
    advantages, returns = gae(rewards, values, mask, float(algo.gamma), float(algo.lam))
    if algo.whiten_advantages:
        advantages = whiten_advantages(advantages, mask)
    batch.values, batch.returns, batch.advantages = values, returns, advantages
    batch.extras["kl_seq"] = kl.sum(1)
    return batch


def _optim_targets(ctx: RunContext, critic: ValueState) -> list[OptimTarget]:
    """What to clip and step: the shared head belongs to the policy's clipping group."""
    policy = policy_target(ctx)
    params = list(critic.module.parameters())
    if critic.kind == "shared":
        policy.params = policy.params + params
        policy.optimizers = [*policy.optimizers, critic.optimizer]
        return [policy]
    return [policy, OptimTarget("value", params, [critic.optimizer], policy.max_grad_norm)]


def _follow_policy_schedule(ctx: RunContext, critic: ValueState) -> None:
    """Scale the value learning rate by the policy schedule's current factor."""
    assert ctx.optimizer is not None
    base = float(ctx.cfg.rl.optim.lr)
    factor = ctx.optimizer.param_groups[0]["lr"] / base if base > 0 else 1.0
    for group in critic.optimizer.param_groups:
        group["lr"] = critic.base_lr * factor


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    algo = ctx.cfg.algorithm
    assert batch.values is not None and batch.returns is not None
    controller, critic = kl_controller(ctx), value_state(ctx)
    kl_in_loss = bool(algo.kl_in_loss) and batch.ref_logprobs is not None
    spec = PolicyLossSpec.from_algorithm(
        algo,
        kl_coef=controller.coef if kl_in_loss else 0.0,
        kl_estimator=str(ctx.cfg.rl.kl_estimator),
        entropy_coef=float(algo.entropy_coef),
    )
    vf_coef, clip = float(algo.vf_coef), float(algo.value_clip)
    critic_metrics: dict[str, float] | None = batch.extras.get(CRITIC_STEPPED)

    def loss_fn(rows: Tensor, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
        if critic_metrics is not None:  # the critic took its step in the advantage phase
            logp, entropy = policy_logprobs(ctx, batch, rows)
            return policy_loss(batch, rows, counts, logp, entropy, spec)
        logp, entropy, values = _forward(ctx, batch, rows, critic)
        loss, metrics = policy_loss(batch, rows, counts, logp, entropy, spec)
        mask = batch.response_mask[rows]
        old, returns = batch.values[rows], batch.returns[rows]
        value_loss, value_metrics = value_term(values, old, returns, mask, counts, clip, algo)
        return loss + vf_coef * value_loss, {**metrics, **value_metrics}

    _follow_policy_schedule(ctx, critic)
    metrics = run_update(
        ctx,
        batch,
        loss_fn,
        epochs=int(algo.ppo_epochs),
        minibatch_size=int(algo.minibatch_size),
        grad_accum_steps=int(algo.grad_accum_steps),
        targets=_optim_targets(ctx, critic) if critic_metrics is None else [policy_target(ctx)],
    )
    if critic_metrics is not None:
        metrics.update({k: v for k, v in critic_metrics.items() if k != "loss/total"})
        metrics["loss/total"] += critic_metrics["loss/total"]
    kl_seq = batch.extras["kl_seq"]
    metrics.update(rl_step_metrics(batch, kl_seq, controller.coef))
    metrics["value/explained_variance"] = float(
        explained_variance(batch.values, batch.returns, batch.response_mask)
    )
    # beta for the next step follows this batch's KL (a no-op for the fixed controller).
    controller.update(float(kl_seq.mean()), batch.num_rows)
    save_kl_controller(ctx.state, controller)
    return metrics
