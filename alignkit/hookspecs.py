"""The hook contract between the alignkit engine and its plugins.

A plugin is a module (or an object) with functions named after these specs and marked with
:data:`alignkit.hookimpl`. It is installed through the ``alignkit`` entry-point group and
activated by name from the config (``algorithm=NAME``, a key under ``reward``, or the
``plugins`` list). Every spec below names when it is called, on which ranks, and what it must
return; ``docs/hooks.md`` documents each one with an example, and a test keeps the two in sync.

Hooks are grouped in three families:

* registration hooks - called once per process at start-up, before the config is composed,
  on every installed plugin (active or not), so that ``algorithm=my_algo`` works for a
  third-party package with no change to alignkit;
* lifecycle hooks - run and step boundaries and checkpoints, on active plugins;
* phase hooks - ``rollout -> reward -> advantage -> update``, once per training step, on
  active plugins. The engine hands the same :class:`~alignkit.batch.Rollout` along.

All hooks are called on every rank; anything that must happen once (writing a file, logging)
checks ``ctx.is_main_process``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig
    from torch import Tensor

    from alignkit.batch import Rollout
    from alignkit.context import RunContext
    from alignkit.needs import AlgorithmNeeds
    from alignkit.registry import ComponentRegistry

PROJECT = "alignkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# registration hooks
# ---------------------------------------------------------------------------------------------


@hookspec
def register_configs(config_store: ConfigStore) -> None:
    """Contribute config schemas (dataclasses) to Hydra's ConfigStore.

    Called once per process at start-up, before the config is composed, on every installed
    plugin. Store a node per option, e.g. ``config_store.store(group="algorithm",
    name="my_algo", node=MyAlgoConfig)``; its fields then become typed, typo-checked keys
    (``algorithm.lr=...``). Returns nothing.
    """


@hookspec
def register_components(registry: ComponentRegistry) -> None:
    """Contribute named components (tasks, annotators, model builders, ...).

    Called once per process at start-up, after :func:`register_configs`, on every installed
    plugin. Call ``registry.add(kind, name, factory)``; the engine builds a component with
    ``registry.build(kind, name, **kwargs)`` when the config names it. Returns nothing.
    """


@hookspec(firstresult=True)
def algorithm_needs(cfg: DictConfig) -> AlgorithmNeeds:
    """Declare what the active algorithm needs: sampling, reward, reference, critic, where the
    KL enters, the smallest group, default weights of its own reward components.

    Called on active plugins when an RL run is set up (and whenever ``ctx.needs`` is read),
    on every rank, with the composed config. The first non-None result wins: the core answers
    last with the defaults (:class:`~alignkit.needs.AlgorithmNeeds`), so only an algorithm
    that differs implements it. Must return an :class:`~alignkit.needs.AlgorithmNeeds`.
    """


# ---------------------------------------------------------------------------------------------
# lifecycle hooks
# ---------------------------------------------------------------------------------------------


@hookspec
def run_start(ctx: RunContext) -> None:
    """The run is set up: models, tokenizer, optimizer and tracker exist in ``ctx``.

    Called once per RL run on every rank, on active plugins, before the first step (and after
    a checkpoint was restored). Use it to build plugin state (e.g. a value head, a KL
    controller) and keep it in ``ctx.state``. Returns nothing.
    """


@hookspec
def run_end(ctx: RunContext, summary: dict[str, float]) -> None:
    """The last step finished; ``summary`` holds the run's headline numbers.

    Called once on every rank, on active plugins. A plugin may add keys to ``summary``
    (they are written to ``summary.json``). Returns nothing.
    """


@hookspec
def step_start(ctx: RunContext, step: int) -> None:
    """A training step begins (``step`` counts from 0).

    Called on every rank, on active plugins, before ``rollout``. Returns nothing.
    """


@hookspec
def step_end(ctx: RunContext, step: int, batch: Rollout, metrics: dict[str, float]) -> None:
    """A training step finished; ``metrics`` will be logged after all implementations return.

    Called on every rank, on active plugins, after ``update``. A plugin may add or change
    entries of ``metrics`` (e.g. ``kl/coef`` from an adaptive KL controller). Returns nothing.
    """


@hookspec
def save_checkpoint(ctx: RunContext, directory: Path) -> None:
    """A checkpoint is being written into ``directory`` (not yet published).

    Called on active plugins after the engine saved the policy, optimizer and RNG states
    there: on the main process on one device, on every rank under a sharded backend (FSDP),
    where each rank writes its shards (``ctx.backend.save_model_state``) and only
    ``ctx.is_main_process`` writes shared files. Write extra files into ``directory``; the
    engine publishes it atomically afterwards, so a crash mid-write never leaves a
    half-written checkpoint.
    State kept in ``ctx.state`` as JSON-able values or tensors is saved for you. Returns
    nothing.
    """


@hookspec
def load_checkpoint(ctx: RunContext, directory: Path) -> None:
    """A checkpoint in ``directory`` has been restored into ``ctx``.

    Called on every rank, on active plugins, before ``run_start``. Read back what
    :func:`save_checkpoint` wrote. Returns nothing.
    """


# ---------------------------------------------------------------------------------------------
# phase hooks: rollout -> reward -> advantage -> update
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def rollout(ctx: RunContext, records: list[Any]) -> Rollout:
    """Produce this step's batch from ``records`` (the N task prompts of the step).

    Called once per step on every rank (each rank passes its own share of prompts). The first
    non-None result wins: the core's rollout (``ctx.sample(records)``) is registered
    ``trylast``, so an algorithm may replace it (an offline method reads preference pairs
    instead; DAPO samples more prompts through ``ctx.draw_prompts``). Must return a
    :class:`~alignkit.batch.Rollout` with prompt/response tensors, ``group_ids`` and (for
    on-policy methods) the sampling ``logprobs``; ``ref_logprobs`` and ``kl`` when the run
    has a reference. It may score its batch (``ctx.score``); the engine then does not.
    """


@hookspec
def reward(ctx: RunContext, batch: Rollout) -> dict[str, Tensor] | None:
    """Score the batch: return ``{component_name: (B,) float tensor}``, or None to abstain.

    Called on every rank, on every active plugin (results are collected, not first-wins),
    with the rows this rank rolled out: under ``backend=fsdp`` each rank scores its own
    share, and the scored shares are gathered before ``advantage``. Called through
    ``ctx.score(batch)``: by the engine once per step after ``rollout`` (unless the rollout
    scored its batch already, or the algorithm declared ``reward=False``), and by an
    algorithm on batches of its own (ReMax's greedy baseline). The scores are combined as
    ``sum_k weight_k * score_k`` with weights from ``reward.<name>.weight`` (or the
    algorithm's declared defaults), the total stored in ``batch.rewards`` and each raw
    component in ``batch.reward_components``, and logged as ``reward/<name>``.
    """


@hookspec(firstresult=True)
def advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    """Turn ``batch.rewards`` into per-token ``batch.advantages`` (and ``returns``).

    Called once per step on every rank, on the whole (gathered) batch; the active algorithm
    answers (first result wins), else the core runs the registered estimator named by
    ``algorithm.advantage_estimator`` (:mod:`alignkit.rl.advantages`). Must return the batch
    with ``advantages`` set, shape (B, R), 0 where masked (unless the algorithm declared
    ``advantages=False``), and ``values``/``returns`` for a declared critic. Changes no
    weights and takes no optimizer step: a critic may accumulate the gradient of the forward
    that gave its values, and the ``update`` phase steps it.
    """


@hookspec(firstresult=True)
def update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    """Optimise the policy (and any critic) on the batch; return scalar metrics.

    Called once per step on every rank; the active algorithm answers (first result wins),
    else the core's policy-gradient update with the registered loss named by
    ``algorithm.policy_loss`` (:func:`alignkit.rl.policy_gradient_update`). Every optimizer
    step of the step happens here. Metric names are namespaced, e.g. ``loss/policy``,
    ``policy/entropy``; the engine adds ``kl/ref`` and ``kl/coef`` from the batch.
    """
