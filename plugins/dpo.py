"""``algorithm=dpo``: Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model") on stored preference pairs,
with IPO and SimPO as ``algorithm.preference_loss``.

With ``h`` the chosen reply's score minus the rejected one's
(:mod:`alignkit.rl.preference`), each loss registered under kind ``preference_loss``::

    sigmoid  DPO eq. 7, log-ratios to the reference summed over tokens, with label smoothing e
             (conservative DPO):       -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo      IPO (Azar et al. 2023) eq. 17, log-ratios averaged over tokens:
                                       (h - 1 / (2 beta))^2
    simpo    SimPO (Meng et al. 2024) eq. 6, reference-free, the policy's mean token
             log-likelihood:            -log sigmoid(beta h - gamma)

Data: ``algorithm.data``, else the pipeline's feedback (``alignkit algorithm=dpo`` trains on
the feedback the pipeline collects and skips the reward model), else
``task.preference_data``; a standard preference data set or alignkit feedback
(:func:`alignkit.data.preference_pairs`). Each step takes one pair of every prompt the run's
sampler draws, a prompt's pairs in a seeded order. The reference is the frozen SFT policy
(the base model with its adapters disabled under LoRA); nothing is sampled or scored, and the
engine's ``rl.probe_every`` samples describe the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit import (
    AlgorithmNeeds,
    ComponentRegistry,
    ConfigError,
    Rollout,
    RunContext,
    hookimpl,
    store_algorithm,
)
from alignkit.data import preference_pairs
from alignkit.rl import PreferenceConfig, PreferenceLoss, preference_update

PAIRS, VISITS = "dpo/pairs", "dpo/visits"


@dataclass
class DPOConfig(PreferenceConfig):
    name: str = "dpo"
    beta: float = 2.0
    """The paper's 0.1 drifts to long, wrong replies here (gold 0.12, KL 27 nats at the
    default ``rl.optim.lr``); 2.0 measured best on the built-in task (docs/algorithms.md)."""
    data: str | None = None
    """Preference data; null: the pipeline's feedback, else ``task.preference_data``."""


def sigmoid_loss(h: Tensor, cfg: Any) -> Tensor:
    e, beta = float(cfg.label_smoothing), float(cfg.beta)
    return -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)


def ipo_loss(h: Tensor, cfg: Any) -> Tensor:
    return (h - 1.0 / (2.0 * float(cfg.beta))) ** 2


def simpo_loss(h: Tensor, cfg: Any) -> Tensor:
    return -F.logsigmoid(float(cfg.beta) * h - float(cfg.gamma))


LOSSES = {
    "sigmoid": PreferenceLoss(sigmoid_loss),
    "ipo": PreferenceLoss(ipo_loss, length_normalised=True),
    "simpo": PreferenceLoss(simpo_loss, reference=False, length_normalised=True),
}


@hookimpl
def register_configs(config_store: Any) -> None:
    store_algorithm(config_store, "dpo", DPOConfig)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    for name, loss in LOSSES.items():
        registry.add("preference_loss", name, loss)


@hookimpl
def algorithm_needs(cfg: Any) -> AlgorithmNeeds:
    free = str(cfg.algorithm.preference_loss) == "simpo"  # the one reference-free loss
    return AlgorithmNeeds(
        sampling=False, reward=False, reference=not free, advantages=False, kl_in="none"
    )


@hookimpl
def run_start(ctx: RunContext) -> None:
    source = ctx.cfg.algorithm.data or ctx.artifacts.feedback or ctx.cfg.task.get("preference_data")
    if not source:
        raise ConfigError(
            "algorithm=dpo needs preference pairs: set algorithm.data=<data>, or "
            "task.preference_data, or run it in the pipeline, which collects feedback"
        )
    pairs = preference_pairs(str(source), seed=int(ctx.cfg.seed))
    why = f"no RL prompt (task.prompt_data) has a pair in {source}"
    ctx.prompt_sampler.keep(lambda record: record.id in pairs, why)
    # Read-only, so never checkpointed (only JSON-able state is): rebuilt on resume.
    ctx.state[PAIRS] = MappingProxyType(pairs)
    ctx.state.setdefault(VISITS, {})  # prompt id -> pairs taken; checkpointed


@hookimpl
def rollout(ctx: RunContext, records: list[Any]) -> Rollout:
    pairs = ctx.state[PAIRS]
    visits = ctx.state[VISITS]
    taken = [pairs[r.id][visits.get(r.id, 0) % len(pairs[r.id])] for r in records]
    batch = ctx.encode([r for r in records for _ in (0, 1)], [t for pair in taken for t in pair])
    batch.group_ids = torch.arange(len(records), device=ctx.device).repeat_interleave(2)
    if ctx.ref_policy is not None:
        batch.ref_logprobs = ctx.logprobs(ctx.ref_policy, batch)
    return batch


@hookimpl
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    return preference_update(ctx, batch)


@hookimpl
def step_end(ctx: RunContext, step: int, batch: Rollout, metrics: dict[str, float]) -> None:
    # Counted on the global batch (every rank's pairs), so every rank keeps the same state.
    visits = ctx.state[VISITS]
    for record in batch.records[::2]:
        visits[record.id] = visits.get(record.id, 0) + 1
