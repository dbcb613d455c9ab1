"""The run context handed to every lifecycle and phase hook, and the plugin API on it.

Besides the run's models and state, :class:`RunContext` carries the calls an algorithm plugin
builds on (``docs/plugin-api.md``): :meth:`~RunContext.sample` (the configured rollout
engine, with options), :meth:`~RunContext.score` (the configured reward components and
weights), :meth:`~RunContext.draw_prompts` (the checkpointed prompt sampler),
:attr:`~RunContext.needs` (what the active algorithm declared) and
:meth:`~RunContext.sum_over_ranks` (for data-dependent loops that must agree across ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from alignkit.backends.base import Backend
from alignkit.backends.cpu import CPUBackend
from alignkit.batch import Rollout
from alignkit.errors import ConfigError, PluginError
from alignkit.needs import AlgorithmNeeds, Artifacts

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from alignkit.registry import ComponentRegistry
    from alignkit.tracking import Tracker


NEEDS_KEY = "core/needs"
"""``state`` key of the algorithm's declared needs (not JSON-able: not checkpointed)."""


class HookCaller(Protocol):
    """What the context needs of the plugin manager (:class:`alignkit.plugins.PluginManager`)."""

    def call(self, hook: str, **kwargs: Any) -> Any: ...

    def implementers(self, hook: str) -> list[str]: ...


class PromptSource(Protocol):
    """The run's checkpointed prompt sampler (:class:`alignkit.engine.PromptSampler`)."""

    def next(self, n: int) -> list[Any]: ...

    def keep(self, predicate: Callable[[Any], bool], why: str = ...) -> int: ...


@dataclass
class RunContext:
    """What a plugin may use: models, tokenizer, task, config, tracker and its own state.

    Plugins never import the engine; everything they need arrives here. ``rank`` and
    ``world_size`` mirror the backend's process group (0 and 1 on one device). ``state`` is a dict
    for plugin-owned values (a KL controller's coefficient, a value head); JSON-able values and
    tensors in it are saved in checkpoints and restored on resume.
    """

    cfg: DictConfig
    run_dir: Path
    plugins: HookCaller
    registry: ComponentRegistry
    tracker: Tracker
    task: Any = None
    policy: torch.nn.Module | None = None
    """The causal LM being trained (a transformers ``PreTrainedModel``)."""
    tokenizer: Any = None
    ref_policy: torch.nn.Module | None = None
    """Frozen reference policy: built when ``rl.kl_coef > 0`` and the algorithm's KL enters
    somewhere (``AlgorithmNeeds.kl_in`` is not ``none``), or when the algorithm declares
    ``reference=True``; None otherwise."""
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: torch.Generator | None = None
    """Seeded generator for sampling, so runs are reproducible and resumable. It lives on
    :attr:`device` (draw with ``device=ctx.device``) and has the same state on every rank:
    :func:`alignkit.models.generation.generate` takes each rank's rows of the global batch's
    draws."""
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    backend: Backend = field(default_factory=lambda: CPUBackend({"name": "cpu", "device": "cpu"}))
    """Device placement, collectives and checkpoint I/O (:mod:`alignkit.backends`). Under
    ``backend=fsdp`` ``ctx.backend.all_reduce`` gives plugins the sum/mean over ranks."""
    artifacts: Artifacts = field(default_factory=Artifacts)
    """What earlier stages of the pipeline produced (the trained reward model, ...)."""
    prompt_sampler: PromptSource | None = None
    """The RL run's prompt sampler (set by the engine); draw with :meth:`draw_prompts`."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def stage_dir(self, name: str) -> Path:
        """``<run_dir>/<name>``, created on first use."""
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -----------------------------------------------------------------------------------------
    # the plugin API
    # -----------------------------------------------------------------------------------------

    @property
    def needs(self) -> AlgorithmNeeds:
        """What the active algorithm declared (the ``algorithm_needs`` hook; the defaults
        when no active plugin answers, or the context has no plugin manager). Asked once per
        config (kept in ``state``)."""
        if self.plugins is None:
            return AlgorithmNeeds()
        cached = self.state.get(NEEDS_KEY)
        if cached is not None and cached[0] is self.cfg and cached[1] is self.plugins:
            return cached[2]
        needs = self.plugins.call("algorithm_needs", cfg=self.cfg)
        if needs is None:
            return AlgorithmNeeds()
        if not isinstance(needs, AlgorithmNeeds):
            raise PluginError(
                f"algorithm_needs returned {type(needs).__name__}, expected AlgorithmNeeds"
            )
        self.state[NEEDS_KEY] = (self.cfg, self.plugins, needs)
        return needs

    @property
    def kl_estimator(self) -> str:
        """The run's KL estimator: ``rl.kl_estimator``, or the default for where the active
        algorithm's KL enters (k1 in the reward, k3 in the loss)."""
        return self.needs.kl_estimator(self.cfg.rl.get("kl_estimator"))

    def reward_weight(self, component: str) -> float:
        """The weight of reward component ``name`` (or ``name/sub``): ``reward.<name>.weight``,
        else the default the active algorithm declared for its own component."""
        key = component.split("/")[0]
        node = (self.cfg.get("reward") or {}).get(key)
        if node is not None and node.get("weight") is not None:
            return float(node.weight)
        defaults = self.needs.reward_weights
        if key in defaults:
            return float(defaults[key])
        raise ConfigError(f"reward component {component!r} has no weight: set reward.{key}.weight")

    def score(self, batch: Rollout) -> Rollout:
        """Score ``batch`` with every active reward plugin; return it scored.

        Sets ``batch.rewards`` to ``sum_k weight_k * component_k`` (:meth:`reward_weight`)
        and ``batch.reward_components`` to the raw components, on the batch's device. The
        engine does not score a batch again that its rollout scored. Under FSDP call it on
        this rank's rows (in ``rollout``): the engine gathers scored batches.
        """
        from alignkit.rewards.combine import combine_rewards

        results = [r for r in self.plugins.call("reward", ctx=self, batch=batch) if r]
        total, components = combine_rewards(results, self.reward_weight, batch.num_rows)
        device = batch.response_ids.device
        batch.rewards = total.to(device)
        batch.reward_components = {k: v.to(device) for k, v in components.items()}
        return batch

    def sample(
        self,
        records: Sequence[Any],
        *,
        samples_per_prompt: int | None = None,
        greedy: bool = False,
        temperature: float | None = None,
        reference: bool = True,
    ) -> Rollout:
        """Responses of the current policy to ``records`` from the configured rollout engine.

        ``samples_per_prompt`` (default ``rl.samples_per_prompt``) rows per record, grouped;
        ``greedy`` takes the arg-max token; ``temperature`` (default ``rl.temperature``)
        scales the sampling logits. ``logprobs`` are the trainer's at ``rl.temperature``
        (what the update recomputes): when the engine's are not (another engine, another
        temperature), the trainer's are computed and the engine's kept in
        ``extras["rollout/engine_logprobs"]`` with the mismatch weights. With ``reference``
        and a reference policy, ``ref_logprobs`` and the per-token ``kl`` are set. Call it on
        this rank's records (``draw_prompts`` gives them); every rank must call it alike.
        """
        from alignkit.rollout.sampling import SamplingOptions, sample_rollout

        rl = self.cfg.rl
        options = SamplingOptions.from_config(rl, greedy=greedy, temperature=temperature)
        group = int(rl.samples_per_prompt) if samples_per_prompt is None else samples_per_prompt
        return sample_rollout(self, list(records), options, group, reference=reference)

    def encode(self, records: Sequence[Any], responses: Sequence[str]) -> Rollout:
        """A batch of given responses (texts, one per record) to ``records``, as the policy
        would have produced them: prompts in the policy's format, each response ending with
        EOS. Each row is its own group; no log-probs are set (see :meth:`logprobs`)."""
        from alignkit.rollout.sampling import encode_responses

        return encode_responses(self, list(records), list(responses))

    def logprobs(self, model: torch.nn.Module, batch: Rollout) -> torch.Tensor:
        """(B, R) log-probs of the batch's responses under ``model`` at ``rl.temperature``, 0
        at padding, without grad (use :func:`alignkit.rl.policy_logprobs` in a loss)."""
        from alignkit.rollout.sampling import scored_logprobs

        return scored_logprobs(self, model, batch)

    def draw_prompts(self, n: int) -> list[Any]:
        """This rank's share of the next ``n`` prompts of the run's checkpointed sampler.

        Every rank draws the same ``n`` global prompts (so the sampler stays in step across
        ranks and a resume continues it); ``n`` must be a multiple of the number of ranks.
        """
        if self.prompt_sampler is None:
            raise ConfigError("draw_prompts: no prompt sampler (only inside an RL run)")
        if n % self.backend.world_size:
            raise ConfigError(
                f"draw_prompts({n}): not a multiple of the {self.backend.world_size} ranks"
            )
        return list(self.backend.shard(self.prompt_sampler.next(n)))

    def sum_over_ranks(self, value: float) -> float:
        """``value`` summed over data-parallel ranks (itself on one device).

        A data-dependent loop (keep sampling until enough groups qualify) must take the same
        number of collective forwards on every rank: decide on the global count.
        """
        if not self.backend.distributed:
            return float(value)
        total = self.backend.all_reduce(torch.tensor([float(value)], device=self.device), "sum")
        return float(total.item())
