"""``algorithm=ppo``: PPO with a learned critic, as in InstructGPT (Ouyang et al. 2022) and
"The N implementation details of RLHF with PPO" (Huang et al. 2024).

Each response token is an action. The reward is the sequence score on the last response
token and a KL penalty to the reference on every token (Ziegler et al. 2019, eq. 2)::

    r_t = [t == last] * r(x, y) - beta * KL_t(pi || ref)          (KL_t: rl.kl_estimator)

with beta from a fixed or adaptive controller (:mod:`alignkit.rl.kl_control`). A value model
``V`` (a linear head on the policy's last hidden state, or a separate transformer) gives GAE
advantages (Schulman et al. 2016, eq. 16; gamma = 1, lambda configurable), whitened over the
valid tokens of the batch. The loss minimised over ``ppo_epochs`` passes of minibatches::

    L = agg( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) )                 Schulman 2017, eq. 7
        + vf_coef * agg( 0.5 * max((V - R)^2, (V_clip - R)^2) )            clipped value loss
        - entropy_coef * agg(H)

with ``rho = pi / pi_old``; ``pi_old`` is the sampling policy, whose log-probs the rollout
recorded (no second forward pass). With ``kl_in_loss`` the KL leaves the reward and becomes a
``beta * agg(KL)`` term of the loss instead.

The critic is the core's (:mod:`alignkit.rl.critic`, declared with ``critic=True``). A
separate critic that takes one optimizer step per batch gets its gradient from the forward
that gives the rollout's values (``value_forward_once``): ``V_old = V`` there, so the value
term is the same; the advantage phase accumulates it, and the update phase steps it beside
the policy, so every optimizer step happens in ``update``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from torch import Tensor

from alignkit import AlgorithmConfig, AlgorithmNeeds, Rollout, RunContext, hookimpl
from alignkit.config import store_algorithm
from alignkit.rl import (
    Counts,
    OptimTarget,
    PolicyLossSpec,
    policy_logprobs,
    policy_loss,
    policy_target,
    run_update,
    token_rewards,
)
from alignkit.rl.critic import (
    Critic,
    CriticConfig,
    accumulate_critic,
    critic_state,
    critic_target,
    follow_policy_schedule,
    policy_and_values,
    rollout_values,
    step_critic,
    value_term,
)
from alignkit.rl.kl_control import KLController, kl_controller_from_state, save_kl_controller
from alignkit.rl.ops import explained_variance, gae, masked_whiten, whiten_advantages


@dataclass
class PPOConfig(CriticConfig, AlgorithmConfig):
    name: str = "ppo"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance (mean kept) before GAE."""
    whiten_advantages: bool = True
    policy_loss: str = "ppo_clip"
    """Registered policy loss (kind ``policy_loss``)."""
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
    ``minibatch_size * grad_accum_steps`` >= the batch) learns from the forward that gives
    the rollout's values: its weights do not change between the rollout and its step, so
    the update's forward would recompute those values (``V_old = V``): the step is the same,
    to float rounding, with one critic forward fewer. false keeps the separate no-grad
    forward."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "ppo", PPOConfig)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    return AlgorithmNeeds(critic=True, kl_in="loss" if cfg.algorithm.kl_in_loss else "reward")


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


@hookimpl
def run_start(ctx: RunContext) -> None:
    critic_state(ctx)
    save_kl_controller(ctx.state, kl_controller(ctx))


def _critic_steps_once(ctx: RunContext, batch: Rollout, critic: Critic) -> bool:
    """Whether this batch trains the separate critic in a single optimizer step (see
    ``value_forward_once``), so its rollout forward can be the one it learns from."""
    algo = ctx.cfg.algorithm
    rows_per_step = int(algo.minibatch_size) * int(algo.grad_accum_steps)
    return (
        critic.kind == "separate"
        and bool(algo.value_forward_once)
        and int(algo.ppo_epochs) == 1
        and batch.num_rows <= rows_per_step
    )


def _values_with_gradient(
    ctx: RunContext, batch: Rollout, critic: Critic, rewards: Tensor
) -> Tensor:
    """(B, R) values whose critic gradient is accumulated for the update's step: each
    micro-batch's returns come from GAE of its ``rewards`` and detached values, and its loss
    is the update's value term with ``V_old = V``."""
    algo, mask = ctx.cfg.algorithm, batch.response_mask

    def loss_fn(
        rows: Tensor, v: Tensor, counts: Counts
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        old, row_mask = v.detach(), mask[rows]
        _, returns = gae(rewards[rows], old, row_mask, float(algo.gamma), float(algo.lam))
        agg, clip = str(algo.loss_agg), float(algo.value_clip)
        loss, metrics = value_term(v, old, returns, row_mask, counts, clip, agg)
        return float(algo.vf_coef) * loss, metrics, returns

    return accumulate_critic(
        ctx,
        batch,
        critic,
        loss_fn,
        minibatch_size=int(algo.minibatch_size),
        grad_accum_steps=int(algo.grad_accum_steps),
    )


@hookimpl
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    algo, mask = ctx.cfg.algorithm, batch.response_mask
    critic = critic_state(ctx)
    beta = 0.0 if algo.kl_in_loss else kl_controller(ctx).coef
    rewards = token_rewards(ctx, batch, kl_coef=beta)
    if algo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if _critic_steps_once(ctx, batch, critic):
        values = _values_with_gradient(ctx, batch, critic, rewards)
    else:
        values = rollout_values(ctx, batch, critic, int(algo.minibatch_size))
    advantages, returns = gae(rewards, values, mask, float(algo.gamma), float(algo.lam))
    if algo.whiten_advantages:
        advantages = whiten_advantages(advantages, mask)
    batch.values, batch.returns, batch.advantages = values, returns, advantages
    return batch


def _optim_targets(ctx: RunContext, critic: Critic) -> list[OptimTarget]:
    """What to clip and step: the shared head belongs to the policy's clipping group."""
    policy = policy_target(ctx)
    if critic.kind == "shared":
        policy.params = policy.params + list(critic.module.parameters())
        policy.optimizers = [*policy.optimizers, critic.optimizer]
        return [policy]
    return [policy, critic_target(ctx, critic)]


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    algo = ctx.cfg.algorithm
    assert batch.values is not None and batch.returns is not None
    controller, critic = kl_controller(ctx), critic_state(ctx)
    kl_in_loss = bool(algo.kl_in_loss) and batch.ref_logprobs is not None
    spec = PolicyLossSpec.for_run(ctx, batch, kl_coef=controller.coef if kl_in_loss else 0.0)
    stepped = critic.pending is not None
    critic_metrics = step_critic(ctx, critic)  # the one-forward critic's accumulated step
    values, returns = batch.values, batch.returns

    def loss_fn(rows: Tensor, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
        if stepped:  # the critic has taken its step: the update trains the policy alone
            logp, entropy = policy_logprobs(ctx, batch, rows)
            return policy_loss(batch, rows, counts, logp, entropy, spec)
        logp, entropy, v = policy_and_values(ctx, batch, rows, critic)
        loss, metrics = policy_loss(batch, rows, counts, logp, entropy, spec)
        mask, agg, clip = batch.response_mask[rows], str(algo.loss_agg), float(algo.value_clip)
        value_loss, value_metrics = value_term(
            v, values[rows], returns[rows], mask, counts, clip, agg
        )
        return loss + float(algo.vf_coef) * value_loss, {**metrics, **value_metrics}

    follow_policy_schedule(ctx, critic)
    metrics = run_update(
        ctx,
        batch,
        loss_fn,
        epochs=int(algo.ppo_epochs),
        minibatch_size=int(algo.minibatch_size),
        grad_accum_steps=int(algo.grad_accum_steps),
        targets=[policy_target(ctx)] if stepped else _optim_targets(ctx, critic),
    )
    if stepped:
        metrics.update({k: v for k, v in critic_metrics.items() if k != "loss/total"})
        metrics["loss/total"] += critic_metrics["loss/total"]
    metrics["kl/coef"] = controller.coef
    metrics["value/explained_variance"] = float(
        explained_variance(batch.values, batch.returns, batch.response_mask)
    )
    # beta for the next step follows this batch's KL (a no-op for the fixed controller).
    kl_seq = batch.kl.sum(1) if batch.kl is not None else batch.rewards.new_zeros(batch.num_rows)
    controller.update(float(kl_seq.mean()), batch.num_rows)
    save_kl_controller(ctx.state, controller)
    return metrics
