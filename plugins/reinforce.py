"""``algorithm=reinforce``: REINFORCE with a batch-mean baseline and a KL penalty in the reward.

For each response y to prompt x the sequence score is (Williams 1992; Ziegler et al. 2019,
eq. 2 for the KL-shaped reward)::

    s(x, y) = r(x, y) - beta * sum_t [log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t)]

and every response token gets the advantage ``A = s - mean_batch(s)`` (optionally divided by
the batch std). One optimiser step per RL step on the exact on-policy gradient
``-sum_tokens A * log pi / num_tokens``; ``minibatch_size`` only bounds memory (gradients are
accumulated and normalised by the global token count, so it does not change the result).
When another engine sampled (``rollout=vllm``), each token's term is multiplied by its
mismatch-correction weight (:mod:`alignkit.rollout.mismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore

from alignkit import Rollout, RunContext, hookimpl
from alignkit.config import AlgorithmConfig, store_algorithm
from alignkit.models import sequence_logprobs
from alignkit.rl import sequence_rewards
from alignkit.rollout import IS_WEIGHTS


@dataclass
class ReinforceConfig(AlgorithmConfig):
    name: str = "reinforce"
    whiten: bool = True
    """Divide the centred scores by their batch std (scale-free learning rate)."""
    minibatch_size: int = 64
    """Rows per forward/backward; gradients are accumulated over the whole batch."""


@hookimpl
def register_configs(config_store: ConfigStore) -> None:
    store_algorithm(config_store, "reinforce", ReinforceConfig)


@hookimpl
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    scores = sequence_rewards(ctx, batch)  # the KL (rl.kl_estimator, k1 by default) shaped in
    centred = scores - scores.mean()
    if ctx.cfg.algorithm.whiten and scores.numel() > 1:
        centred = centred / (scores.std() + 1e-8)
    batch.advantages = centred[:, None] * batch.response_mask
    return batch


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    policy, optimizer = ctx.policy, ctx.optimizer
    assert policy is not None and optimizer is not None and batch.advantages is not None
    temperature = float(ctx.cfg.rl.temperature)
    seq, seq_mask = batch.sequences()
    start = batch.prompt_ids.shape[1]
    num_tokens = batch.response_mask.sum().clamp(min=1)
    step_size = int(ctx.cfg.algorithm.minibatch_size)
    # Another engine sampled: each token is weighted by its mismatch correction.
    weights = batch.extras.get(IS_WEIGHTS)
    optimizer.zero_grad(set_to_none=True)
    loss_total, entropy_total = 0.0, 0.0
    for lo in range(0, batch.num_rows, step_size):
        sl = slice(lo, lo + step_size)
        logp, entropy = sequence_logprobs(
            policy, seq[sl], seq_mask[sl], start, temperature=temperature, return_entropy=True
        )
        mask = batch.response_mask[sl]
        weighted = mask if weights is None else mask * weights[sl]
        # Normalised by the global token count so accumulation equals one full-batch step.
        loss = -(batch.advantages[sl] * logp * weighted).sum() / num_tokens
        loss.backward()
        loss_total += loss.item()
        entropy_total += (entropy.detach() * mask).sum().item()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        policy.parameters(), float(ctx.cfg.rl.optim.max_grad_norm)
    )
    optimizer.step()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    return {
        "loss/policy": loss_total,
        "policy/entropy": entropy_total / num_tokens.item(),
        "policy/grad_norm": grad_norm.item(),
        "lr": optimizer.param_groups[0]["lr"],
    }
