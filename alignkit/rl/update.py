"""The minibatch update loop shared by the policy-gradient algorithms.

One call of :func:`run_update` is one RL step's optimisation::

    for epoch in range(epochs):                      # passes over the batch
        for minibatch in shuffled(batch, rows=minibatch_size * grad_accum_steps):
            zero_grad()
            for micro in split(minibatch, rows=minibatch_size):   # gradient accumulation
                loss_fn(micro, counts_of(minibatch)).backward()
            clip_grad_norm(); optimizer.step()

``minibatch_size`` bounds memory (rows per forward/backward); ``grad_accum_steps`` sets how
many of them make one optimizer step. The loss function receives the *global* counts of the
whole minibatch (:class:`Counts`) and normalises by them, so the summed micro-batch losses
equal the loss of the full minibatch: splitting it differently never changes the gradient.

Data parallel (``backend=fsdp`` on N ranks): every rank holds the step's global batch (cheap:
token ids, masks and per-token floats) and builds the same plan of global minibatches, so an
optimizer step sees exactly the rows it would see in one process; each rank then forwards
and backwards only its ``1/N`` share of every minibatch (:func:`rank_share`), normalised by
the minibatch's global counts. The shares' gradients add up to the single-process gradient
(FSDP averages over ranks, so each rank's loss is scaled by N before ``backward``), and the
metrics, shares of global values too, are summed over ranks once per update. A run's
optimisation is therefore the same on any number of ranks; ``minibatch_size`` caps the rows
of one forward on one rank.

Algorithms supply the per-micro-batch loss; :func:`policy_loss` is the clipped
policy-gradient loss that GRPO, RLOO, REINFORCE++ and PPO share.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.batch import Rollout
from alignkit.config import AlgorithmConfig
from alignkit.context import RunContext
from alignkit.engine.guards import guard_optimizer
from alignkit.errors import ConfigError
from alignkit.models import packs, response_logprobs
from alignkit.rl.losses import DEFAULT_POLICY_LOSS, PolicyLossFn, ppo_clip
from alignkit.rl.ops import aggregate_loss, kl_penalty, masked_mean, masked_sum
from alignkit.rollout.engines import IS_WEIGHTS

__all__ = [
    "Counts",
    "DataParallel",
    "LossFn",
    "OptimTarget",
    "PolicyGradientConfig",
    "PolicyLossSpec",
    "gather_rows",
    "group_sorted",
    "length_sorted",
    "minibatches",
    "policy_gradient_update",
    "policy_logprobs",
    "policy_loss",
    "policy_target",
    "rank_rows",
    "rank_share",
    "run_minibatch_updates",
    "run_update",
    "step_metrics",
    "step_targets",
    "used_columns",
]


@dataclass(frozen=True)
class Counts:
    """Global normalisers of one optimizer step (a minibatch and all its micro-batches)."""

    num_tokens: float
    """Valid response tokens in the minibatch."""
    num_seqs: int
    """Rows in the minibatch."""
    max_len: int
    """The fixed length of ``seq_mean_token_sum_norm`` (the generation budget)."""

    def aggregate(self, per_token: Tensor, mask: Tensor, mode: str) -> Tensor:
        """:func:`alignkit.rl.ops.aggregate_loss` with these global counts."""
        return aggregate_loss(
            per_token,
            mask,
            mode,
            num_tokens=self.num_tokens,
            num_seqs=self.num_seqs,
            max_len=self.max_len,
        )

    def token_share(self, x: Tensor, mask: Tensor) -> Tensor:
        """This micro-batch's part of the minibatch token mean of ``x`` (sums to the mean)."""
        return masked_sum(x.detach(), mask) / max(self.num_tokens, 1.0)

    def share_of_mean(self, local_mean: Tensor, mask: Tensor) -> Tensor:
        """The same for a token mean already taken over this micro-batch's valid tokens."""
        return local_mean.detach() * mask.sum() / max(self.num_tokens, 1.0)


LossFn = Callable[[Tensor, Counts], tuple[Tensor, dict[str, Tensor]]]
"""``loss_fn(rows, counts) -> (loss, metrics)`` for the micro-batch ``batch[rows]``.

``loss`` is normalised by ``counts`` (so micro-batch losses add up to the minibatch loss);
each metric is this micro-batch's share of a minibatch-level value (they are summed over
micro-batches and data-parallel ranks, then averaged over optimizer steps).
"""

MeanFn = Callable[[dict[str, float]], dict[str, float]]
"""The mean of each value over data-parallel ranks (``Backend.all_reduce_mean``)."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks of an update."""

    rank: int = 0
    world_size: int = 1
    mean: MeanFn | None = None
    """Mean over ranks (one collective); required when ``world_size > 1``."""

    @classmethod
    def of(cls, ctx: RunContext) -> DataParallel:
        """The run's backend's ranks; one process for a single-device backend."""
        backend = ctx.backend
        if backend is None or not backend.distributed:
            return cls()
        return cls(int(backend.rank), int(backend.world_size), backend.all_reduce_mean)


@dataclass
class OptimTarget:
    """Parameters whose gradient norm is clipped together, and the optimizers that step them."""

    name: str
    """Metric prefix: ``<name>/grad_norm``."""
    params: list[nn.Parameter]
    optimizers: Sequence[torch.optim.Optimizer]
    max_grad_norm: float

    def clipped(self) -> list[Tensor]:
        """The parameters to clip: those the optimizers step, read when the gradients are.

        Under FSDP a module's ``parameters()`` may be the unsharded tensors of the last
        forward (FSDP2 keeps the root's gathered after a forward), whose ``.grad`` is never
        set: the gradients land on the sharded parameters the optimizers hold. Clipping a
        list taken before the update's forwards would leave those out of the norm and
        unclipped. Without optimizers, ``params``.
        """
        stepped = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        return list({id(p): p for p in stepped}.values()) if stepped else self.params


@dataclass(frozen=True)
class PolicyLossSpec:
    """Settings of :func:`policy_loss`."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    loss_agg: str = "token_mean"
    kl_coef: float = 0.0
    """Coefficient of a KL-to-reference term in the loss; 0 keeps the KL out of the loss."""
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss: PolicyLossFn = ppo_clip
    """The registered per-token surrogate (:mod:`alignkit.rl.losses`)."""

    def __post_init__(self) -> None:
        # k1 = log pi - log ref has E_pi[grad k1] = E_pi[grad log pi] = 0: as a loss term it
        # applies no penalty at all. k2 = (log pi - log ref)^2 / 2 has E_pi[grad k2] = grad KL.
        if self.kl_coef > 0 and self.kl_estimator == "k1":
            raise ConfigError(
                "the k1 KL estimator has zero expected gradient, so as a loss term it applies "
                "no penalty: use k2 (its gradient is exactly grad KL) or k3 for a KL in the loss"
            )

    @classmethod
    def from_algorithm(cls, algo: Any, **terms: Any) -> PolicyLossSpec:
        """Clip range and aggregation from an algorithm config node; ``terms`` for the rest."""
        high = algo.get("clip_eps_high")
        return cls(
            clip_eps=float(algo.clip_eps),
            clip_eps_high=None if high is None else float(high),
            loss_agg=str(algo.loss_agg),
            **terms,
        )

    @classmethod
    def for_run(cls, ctx: RunContext, batch: Rollout, **terms: Any) -> PolicyLossSpec:
        """The run's spec: clip range and aggregation from ``ctx.cfg.algorithm``, the loss
        registered as ``algorithm.policy_loss``, the KL term when the active algorithm keeps
        its KL in the loss (``rl.kl_coef`` with ``ctx.kl_estimator``; dropped when ``batch``
        has no reference log-probs), ``algorithm.entropy_coef``; ``terms`` override any."""
        algo = ctx.cfg.algorithm
        name = str(algo.get("policy_loss") or DEFAULT_POLICY_LOSS)
        in_loss = ctx.needs.kl_in == "loss" and batch.ref_logprobs is not None
        defaults: dict[str, Any] = {
            "kl_coef": float(ctx.cfg.rl.kl_coef) if in_loss else 0.0,
            "kl_estimator": ctx.kl_estimator,
            "entropy_coef": float(algo.get("entropy_coef", 0.0) or 0.0),
            "loss": ctx.registry.get("policy_loss", name),
        }
        return cls.from_algorithm(algo, **{**defaults, **terms})


def minibatches(
    num_rows: int,
    rows_per_step: int,
    epochs: int,
    seed: int,
    whole_groups: Tensor | None = None,
) -> list[list[Tensor]]:
    """Row indices of each optimizer step, one list per epoch (a fresh permutation each).

    The order depends only on ``seed``, ``num_rows`` and ``epochs``, so two runs that differ
    only in how a minibatch is split into micro-batches see the same minibatches. With
    ``whole_groups`` ((B,) group ids of equal-sized groups) the groups are shuffled instead of
    the rows, so every minibatch holds whole groups (a pairwise loss sees both rows of a
    pair); ``rows_per_step`` must then be a multiple of the group size.
    """
    if rows_per_step < 1 or epochs < 1:
        raise ConfigError(
            f"need minibatch rows >= 1 and epochs >= 1, got {rows_per_step} and {epochs}"
        )
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        if whole_groups is None:
            order = torch.randperm(num_rows, generator=generator)
        else:
            order = _group_order(whole_groups, rows_per_step, generator)
        out.append(list(order.split(rows_per_step)))
    return out


def _group_order(groups: Tensor, rows_per_step: int, generator: torch.Generator) -> Tensor:
    """Rows ordered group by group, the groups in a random order."""
    ids, inverse, counts = torch.unique(groups.cpu(), return_inverse=True, return_counts=True)
    size = int(counts[0])
    if bool((counts != size).any()) or rows_per_step % size:
        raise ConfigError(
            f"whole-group minibatches need equal groups and minibatch rows that are a multiple "
            f"of the group size ({size}); got groups of {sorted(set(counts.tolist()))} and "
            f"{rows_per_step} rows per step"
        )
    rank = torch.empty_like(ids)
    rank[torch.randperm(len(ids), generator=generator)] = torch.arange(len(ids))
    return torch.sort(rank[inverse], stable=True).indices


def run_minibatch_updates(
    loss_fn: LossFn,
    response_mask: Tensor,
    targets: Sequence[OptimTarget],
    *,
    epochs: int,
    minibatch_size: int,
    grad_accum_steps: int,
    max_len: int,
    seed: int = 0,
    lengths: Tensor | None = None,
    groups: Tensor | None = None,
    parallel: DataParallel | None = None,
    step: bool = True,
    whole_groups: bool = False,
) -> dict[str, float]:
    """Epochs x minibatches x gradient accumulation; returns metrics averaged over steps.

    Args:
        loss_fn: the per-micro-batch loss (see :data:`LossFn`).
        response_mask: (B, R) mask of the whole batch, for the global token counts.
        targets: what to clip and step after each minibatch.
        epochs: passes over the batch.
        minibatch_size: rows per forward/backward.
        grad_accum_steps: micro-batches per optimizer step.
        max_len: L of the ``seq_mean_token_sum_norm`` aggregation.
        seed: seeds the minibatch shuffling.
        lengths: (B,) real tokens per row. Given, the rows of each minibatch are ordered by
            length before it is split into micro-batches, so rows of similar length share a
            forward and less padding is computed (see :func:`policy_logprobs`). Only the
            order of summation of one optimizer step's gradient changes, not its value.
        groups: (B,) prompt group of each row. Given (in place of ``lengths``), the rows of
            each minibatch are ordered by group instead, so a packed forward (see
            :func:`policy_logprobs`) shares each prompt among its samples in a micro-batch.
        parallel: this rank's place among data-parallel ranks; each trains on its share of
            every minibatch (:func:`rank_share`). None: one process.
        step: False leaves the gradients of a single optimizer step accumulated and takes no
            step (:func:`step_targets` takes it later); the plan must be one minibatch.
        whole_groups: every minibatch and micro-batch holds whole groups of ``groups`` (see
            :func:`minibatches`); ``minibatch_size`` must be a multiple of the group size.

    Returns:
        Each metric of ``loss_fn`` (summed over a minibatch's micro-batches and over ranks)
        plus ``loss/total`` and ``<target>/grad_norm``, averaged over all optimizer steps, and
        ``update/rows``: the rows of the batch this rank trained on (per epoch).
    """
    if minibatch_size < 1 or grad_accum_steps < 1:
        raise ConfigError(
            "algorithm.minibatch_size and algorithm.grad_accum_steps must be >= 1, got "
            f"{minibatch_size} and {grad_accum_steps}"
        )
    parallel = parallel or DataParallel()
    shares: dict[str, float] = defaultdict(float)  # shares of global values: summed over ranks
    norms: dict[str, float] = defaultdict(float)  # already global on every rank
    steps, rows_trained = 0, 0
    if whole_groups and groups is None:
        raise ConfigError("whole-group minibatches need the rows' groups")
    plan = minibatches(
        response_mask.shape[0],
        minibatch_size * grad_accum_steps,
        epochs,
        seed,
        groups if whole_groups else None,
    )
    if whole_groups:
        _group_order(groups, minibatch_size, torch.Generator())  # micro-batches: whole groups
        _check_whole_shares(plan, groups, parallel.world_size)
    _check_divisible(plan, parallel.world_size)
    if not step and sum(len(epoch) for epoch in plan) != 1:
        raise ConfigError("an update whose step is deferred must be a single optimizer step")
    for index, epoch in enumerate(plan):
        for rows in epoch:
            counts = Counts(
                num_tokens=float(response_mask[rows].sum().item()),
                num_seqs=len(rows),
                max_len=max_len,
            )
            for target in targets:
                for optimizer in target.optimizers:
                    optimizer.zero_grad(set_to_none=True)
            mine = rank_share(rows, parallel.rank, parallel.world_size, lengths, groups)
            rows_trained += len(mine) if index == 0 else 0
            ordered = (
                length_sorted(mine, lengths, minibatch_size)
                if groups is None
                else group_sorted(mine, groups, minibatch_size)
            )
            for micro in ordered.split(minibatch_size):
                loss, metrics = loss_fn(micro, counts)
                # FSDP averages gradients over ranks; the shares must add up instead.
                (loss * parallel.world_size if parallel.world_size > 1 else loss).backward()
                shares["loss/total"] += loss.item()
                for key, value in metrics.items():
                    shares[key] += float(value)
            if step:
                for key, value in step_targets(targets).items():
                    norms[key] += value
            steps += 1
    totals = {**_sum_over_ranks(shares, parallel), **norms}
    out = {key: value / max(steps, 1) for key, value in totals.items()}
    out["update/rows"] = float(rows_trained)
    return out


def step_targets(targets: Sequence[OptimTarget]) -> dict[str, float]:
    """Clip each target's gradient norm and step its optimizers; ``{<target>/grad_norm}``.

    A non-finite loss or gradient skips the step (:mod:`alignkit.engine.guards`) instead of writing
    NaN into the weights; the engine counts the skips.
    """
    norms = {}
    for target in targets:
        norm = torch.nn.utils.clip_grad_norm_(target.clipped(), target.max_grad_norm)
        norms[f"{target.name}/grad_norm"] = norm.item()
        for optimizer in target.optimizers:
            guard_optimizer(optimizer)
            optimizer.step()
    return norms


def rank_share(
    rows: Tensor,
    rank: int,
    world_size: int,
    lengths: Tensor | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    """This rank's ``len(rows) / world_size`` rows of a global minibatch.

    With ``groups`` the rows are ordered by prompt group and cut into contiguous shares, so a
    group's samples stay together on a rank (a packed forward shares their prompt). With
    ``lengths`` they are ordered longest first and dealt out in turn, so every rank gets
    rows of similar lengths and no rank waits for another at the gradient reduction.
    ``len(rows)`` must be a multiple of ``world_size`` (see :func:`_check_divisible`).
    """
    if world_size == 1:
        return rows
    if groups is not None:
        ordered = rows[torch.sort(groups[rows], stable=True).indices]
        return ordered.tensor_split(world_size)[rank]
    if lengths is not None:
        ordered = rows[torch.sort(lengths[rows], descending=True, stable=True).indices]
        return ordered[rank::world_size]
    return rows.tensor_split(world_size)[rank]


def rank_rows(ctx: RunContext, num_rows: int) -> Tensor:
    """This rank's contiguous share of ``range(num_rows)`` (all of it in one process).

    For per-row work outside the update (a no-grad forward over the batch) that every rank
    would otherwise repeat; :func:`gather_rows` puts the results back together. ``num_rows``
    must split evenly (the engine's batch does), so every rank runs as many forwards.
    """
    parallel = DataParallel.of(ctx)
    return torch.arange(num_rows).tensor_split(parallel.world_size)[parallel.rank]


def gather_rows(ctx: RunContext, local: Tensor) -> Tensor:
    """(b, ...) rows of :func:`rank_rows` -> (B, ...) rows of every rank, in rank order."""
    if not ctx.backend.distributed:
        return local
    parts = ctx.backend.all_gather_object(local.detach().cpu())
    return torch.cat(parts).to(local.device)


def _check_divisible(plan: list[list[Tensor]], world_size: int) -> None:
    """Every rank must run the same number of forwards (each is collective under FSDP), so
    every minibatch splits into equal shares."""
    if world_size == 1:
        return
    sizes = sorted({len(rows) for epoch in plan for rows in epoch})
    bad = [n for n in sizes if n % world_size]
    if bad:
        raise ConfigError(
            f"a minibatch of {bad[0]} rows does not split evenly over {world_size} ranks: "
            "make algorithm.minibatch_size * algorithm.grad_accum_steps and the batch "
            "(rl.prompts_per_step * rl.samples_per_prompt) multiples of the number of ranks"
        )


def _check_whole_shares(plan: list[list[Tensor]], groups: Tensor, world_size: int) -> None:
    """Each rank's share of every minibatch must hold whole groups (cut at group bounds)."""
    size = int(torch.unique(groups, return_counts=True)[1][0])
    bad = sorted(
        {len(rows) for epoch in plan for rows in epoch if (len(rows) // world_size) % size}
    )
    if bad:
        raise ConfigError(
            f"a minibatch of {bad[0]} rows gives each of the {world_size} ranks a share that "
            f"is not whole groups of {size}: make algorithm.minibatch_size and the batch "
            f"multiples of {size * world_size}"
        )


def _sum_over_ranks(values: dict[str, float], parallel: DataParallel) -> dict[str, float]:
    """``values`` summed over ranks in one collective (every rank has the same keys)."""
    if parallel.world_size == 1 or not values:
        return dict(values)
    assert parallel.mean is not None, "DataParallel.mean is required with world_size > 1"
    return {k: v * parallel.world_size for k, v in parallel.mean(dict(values)).items()}


def length_sorted(rows: Tensor, lengths: Tensor | None, minibatch_size: int) -> Tensor:
    """``rows`` ordered by ``lengths[rows]`` (longest first) when it spans several micro-batches.

    A stable sort, so equal lengths keep the shuffled order; one micro-batch is left as is.
    """
    if lengths is None or len(rows) <= minibatch_size:
        return rows
    order = torch.sort(lengths[rows], descending=True, stable=True).indices
    return rows[order]


def group_sorted(rows: Tensor, groups: Tensor, minibatch_size: int) -> Tensor:
    """``rows`` ordered by ``groups[rows]`` when they span several micro-batches (stable)."""
    if len(rows) <= minibatch_size:
        return rows
    return rows[torch.sort(groups[rows], stable=True).indices]


def policy_target(ctx: RunContext) -> OptimTarget:
    """The policy's trainable parameters, the run's optimizer and ``rl.optim.max_grad_norm``."""
    if ctx.policy is None or ctx.optimizer is None:
        raise ConfigError("an RL update needs ctx.policy and ctx.optimizer")
    return OptimTarget(
        name="policy",
        params=[p for p in ctx.policy.parameters() if p.requires_grad],
        optimizers=[ctx.optimizer],
        max_grad_norm=float(ctx.cfg.rl.optim.max_grad_norm),
    )


def run_update(
    ctx: RunContext,
    batch: Rollout,
    loss_fn: LossFn,
    *,
    epochs: int,
    minibatch_size: int,
    grad_accum_steps: int,
    targets: Sequence[OptimTarget] | None = None,
    step_schedule: bool = True,
    whole_groups: bool = False,
) -> dict[str, float]:
    """:func:`run_minibatch_updates` for a run, then one learning-rate schedule step.

    The schedule steps once per RL step, not per optimizer step: its horizon is ``rl.steps``
    (see ``alignkit.stages.rl``), whatever the number of minibatches. Adds ``lr``, the
    rate this step's updates used. ``step_schedule=False`` leaves the schedule to a later
    call of the same step (a model trained before the policy, such as PPO's critic).
    ``whole_groups=True`` keeps each prompt group (a preference pair) in one micro-batch.
    """
    rl = ctx.cfg.rl
    packed = ctx.policy is not None and packs(ctx.policy)
    metrics = run_minibatch_updates(
        loss_fn,
        batch.response_mask,
        targets if targets is not None else [policy_target(ctx)],
        epochs=int(epochs),
        minibatch_size=int(minibatch_size),
        grad_accum_steps=int(grad_accum_steps),
        max_len=int(rl.get("max_new_tokens", batch.response_mask.shape[1])),
        # A different shuffle every step, reproducible and resumable without saved state.
        seed=int(ctx.cfg.get("seed", 0)) * 1_000_003 + int(ctx.step),
        # Packed forwards need no length sorting; grouping lets samples share their prompt.
        lengths=None if packed else batch.prompt_mask.sum(1) + batch.response_mask.sum(1),
        groups=batch.group_ids if packed or whole_groups else None,
        parallel=DataParallel.of(ctx),
        whole_groups=whole_groups,
    )
    if ctx.optimizer is not None:
        metrics["lr"] = float(ctx.optimizer.param_groups[0]["lr"])  # the rate this step used
    if ctx.scheduler is not None and step_schedule:
        ctx.scheduler.step()
    return metrics


def used_columns(prompt_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """``(first, end)``: the prompt columns from ``first`` and response columns before ``end``
    that any row of this micro-batch uses.

    Prompts are left-padded and responses right-padded to the whole batch's longest, so a
    micro-batch of shorter rows has leading prompt columns and trailing response columns that
    are padding in every row. Keeps at least one column of each.
    """
    p = prompt_mask.shape[1]
    used_p = (prompt_mask != 0).any(0).nonzero()
    used_r = (response_mask != 0).any(0).nonzero()
    first = int(used_p[0]) if len(used_p) else p - 1
    end = int(used_r[-1]) + 1 if len(used_r) else 1
    return min(first, p - 1), max(end, 1)


def policy_logprobs(
    ctx: RunContext, batch: Rollout, rows: Tensor, trim_padding: bool = True
) -> tuple[Tensor, Tensor]:
    """(b, R) log-probs (with grad) and entropies of ``batch[rows]`` under the current policy.

    Uses ``rl.temperature`` like the rollout, so ratios are exactly 1 before any update.

    A supported policy (GPT-2, the Llama family, GPT-NeoX: :mod:`alignkit.models.lean`) runs packed
    (:func:`alignkit.models.response_logprobs`): no linear layer runs on padding and the
    samples of one prompt share its tokens. Other models run
    padded; with ``trim_padding`` their forward skips the columns that are padding in every
    row of the micro-batch (:func:`used_columns`) and the outputs are zero-padded back to R:
    positions come from the mask and padded keys are masked out, so dropping a leading
    all-padding column changes nothing, and no earlier token attends to a trailing one.
    Results agree with the untrimmed forward to float rounding.
    """
    assert ctx.policy is not None
    p_ids, p_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
    r_ids, r_mask = batch.response_ids[rows], batch.response_mask[rows]
    resp_len = r_ids.shape[1]
    first, end = 0, resp_len
    if trim_padding:
        first, end = used_columns(p_mask, r_mask)
        p_ids, p_mask, r_ids, r_mask = (
            p_ids[:, first:],
            p_mask[:, first:],
            r_ids[:, :end],
            r_mask[:, :end],
        )
    out = response_logprobs(
        ctx.policy,
        p_ids,
        p_mask,
        r_ids,
        r_mask,
        temperature=float(ctx.cfg.rl.temperature),
        return_entropy=True,
    )
    assert isinstance(out, tuple)
    if end == resp_len:
        return out
    logp, entropy = out
    pad = (0, resp_len - end)
    return torch.nn.functional.pad(logp, pad), torch.nn.functional.pad(entropy, pad)


def policy_loss(
    batch: Rollout,
    rows: Tensor,
    counts: Counts,
    logp: Tensor,
    entropy: Tensor,
    spec: PolicyLossSpec,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss of a micro-batch, with optional KL and entropy terms.

    ::

        L = agg(l(rho, A))                                            the registered loss
          e.g. max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high))       ppo_clip, Schulman 2017 eq. 7
            + kl_coef * agg(k(logp, ref_logp))                        KL in the loss (GRPO eq. 3)
            - entropy_coef * agg(H)

    with ``rho = exp(logp - old_logp)``, old log-probs from the rollout (``batch.logprobs``)
    and ``agg`` the configured :func:`~alignkit.rl.ops.aggregate_loss` over global counts. When
    another engine sampled, each token's policy-gradient term is multiplied by its mismatch
    weight (``batch.extras[IS_WEIGHTS]``, :mod:`alignkit.rollout.mismatch`).

    Args:
        batch: the step's batch with ``advantages`` and ``logprobs`` set.
        rows: (b,) rows of this micro-batch.
        counts: global counts of the minibatch.
        logp: (b, R) current log-probs (with grad); entropy: (b, R).

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``policy/clipfrac``, ``policy/entropy``,
        ``kl/approx`` (k3 estimate of KL(old || new)) and, with a KL term, ``kl/loss``.
    """
    if batch.logprobs is None or batch.advantages is None:
        raise ValueError("the policy loss needs Rollout.logprobs and Rollout.advantages")
    mask = batch.response_mask[rows]
    old = batch.logprobs[rows]
    high = spec.clip_eps if spec.clip_eps_high is None else spec.clip_eps_high
    per_token, clipfrac = spec.loss(
        logp=logp,
        old_logp=old,
        advantages=batch.advantages[rows],
        mask=mask,
        clip_eps=spec.clip_eps,
        clip_eps_high=high,
    )
    weights = batch.extras.get(IS_WEIGHTS)
    if weights is not None:
        # Another engine sampled: its tokens are corrected towards the trainer's
        # distribution (alignkit.rollout.mismatch; detached, so only the PG term is weighted).
        per_token = per_token * weights[rows]
    pg_loss = counts.aggregate(per_token, mask, spec.loss_agg)
    loss = pg_loss
    log_ratio = torch.where(mask != 0, logp.detach() - old, 0.0)
    metrics = {
        "loss/policy": pg_loss.detach(),
        "policy/clipfrac": counts.share_of_mean(clipfrac, mask),
        "policy/entropy": counts.token_share(entropy, mask),
        # k3 estimate of KL(old || new): >= 0, unbiased, and cheap (Schulman 2020).
        "kl/approx": counts.token_share(torch.expm1(log_ratio) - log_ratio, mask),
    }
    if spec.entropy_coef:
        loss = loss - spec.entropy_coef * counts.aggregate(entropy, mask, spec.loss_agg)
    if spec.kl_coef > 0:
        if batch.ref_logprobs is None:
            raise ValueError("a KL term in the loss needs Rollout.ref_logprobs (rl.kl_coef > 0)")
        kl = kl_penalty(logp, batch.ref_logprobs[rows], spec.kl_estimator)
        kl_term = counts.aggregate(kl, mask, spec.loss_agg)
        loss = loss + spec.kl_coef * kl_term
        metrics["kl/loss"] = kl_term.detach()
    return loss, metrics


@dataclass
class PolicyGradientConfig(AlgorithmConfig):
    """Fields of a critic-free policy-gradient algorithm (GRPO, RLOO, REINFORCE++ and any
    algorithm that picks a registered advantage estimator and policy loss)."""

    advantage_estimator: str | None = None
    """Registered advantage estimator (kind ``advantage``) the core's ``advantage`` hook uses;
    null: the algorithm's own ``advantage`` hook sets the advantages."""
    policy_loss: str = DEFAULT_POLICY_LOSS
    """Registered policy loss (kind ``policy_loss``): ppo_clip, or a plugin's."""
    loss_agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm."""
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    """Upper clip range; null uses ``clip_eps``."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus ``-entropy_coef * agg(H)``."""
    epochs: int = 1
    """Passes over each batch; the ratio clip matters from the second pass on."""
    minibatch_size: int = 16
    """Rows per forward/backward."""
    grad_accum_steps: int = 1
    """Forward/backward passes per optimizer step."""


ClippedPGConfig = PolicyGradientConfig
"""The earlier name of :class:`PolicyGradientConfig`."""


def policy_gradient_update(
    ctx: RunContext,
    batch: Rollout,
    spec: PolicyLossSpec | None = None,
) -> dict[str, float]:
    """:func:`run_update` of the policy alone with :func:`policy_loss` (critic-free methods).

    Epochs, minibatch size and accumulation come from the :class:`PolicyGradientConfig`
    fields of ``ctx.cfg.algorithm``; ``spec`` defaults to :meth:`PolicyLossSpec.for_run`.
    Adds ``kl/coef``, the coefficient of the KL in the loss (0 when it is not there).
    """
    algo = ctx.cfg.algorithm
    spec = spec or PolicyLossSpec.for_run(ctx, batch)

    def loss_fn(rows: Tensor, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
        logp, entropy = policy_logprobs(ctx, batch, rows)
        return policy_loss(batch, rows, counts, logp, entropy, spec)

    metrics = run_update(
        ctx,
        batch,
        loss_fn,
        epochs=int(algo.epochs),
        minibatch_size=int(algo.minibatch_size),
        grad_accum_steps=int(algo.grad_accum_steps),
    )
    if spec.kl_coef:
        metrics["kl/coef"] = spec.kl_coef
    return metrics


def step_metrics(batch: Rollout, kl_coef: float) -> dict[str, float]:
    """``kl/ref`` (mean per-sequence KL of the rollout to the reference, ``batch.kl``; 0
    without one), ``kl/coef`` and ``adv/abs_mean`` (when advantages are set)."""
    kl_ref = float(batch.kl.sum(1).mean()) if batch.kl is not None else 0.0
    metrics = {"kl/ref": kl_ref, "kl/coef": float(kl_coef)}
    if batch.advantages is not None:
        metrics["adv/abs_mean"] = masked_mean(batch.advantages.abs(), batch.response_mask).item()
    return metrics
