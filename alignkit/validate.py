"""Checks of config values, run once after composition and before any model loads.

The structured configs check names and types; they cannot say that ``rl.prompts_per_step=0``
or ``rl.top_p=1.5`` is meaningless. Without this check such a value fails only after the model
has loaded, deep inside a hook, with a message that does not name the key (or, worse, it runs:
an RL step with no prompts, a division by a zero ``log_every``).

:func:`check_config_ranges` raises :class:`~alignkit.errors.ConfigError` naming the first key
out of range and the allowed range. Keys absent from the config (another algorithm's node, a
reward that is not selected) and null values (``null`` means "derive it") are skipped.

It then runs :func:`check_rl_settings`: RL settings that are each in range but train the wrong
thing, silently, in the stages that sample RL rollouts:

* a k1 KL estimate in the loss (zero expected gradient: no penalty at all);
* top-k / top-p rollouts, whose recorded old log-probs are the full distribution's.

What depends on the active algorithm (one sample per prompt where the baseline is the
prompt's group, k1 where the algorithm keeps its KL in the loss) is checked when the RL run
starts, from the algorithm's declared needs (:class:`alignkit.needs.AlgorithmNeeds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignkit.errors import ConfigError
from alignkit.needs import AlgorithmNeeds

__all__ = [
    "RANGES",
    "check_algorithm_components",
    "check_algorithm_needs",
    "check_config_ranges",
    "check_rl_settings",
    "require_groups",
]

# A range is a predicate and the words the error uses for it.
Range = tuple[Callable[[float], bool], str]

POSITIVE: Range = (lambda v: v > 0, "> 0")
AT_LEAST_1: Range = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE: Range = (lambda v: v >= 0, ">= 0")
PROBABILITY: Range = (lambda v: 0 < v <= 1, "in (0, 1]")
UNIT: Range = (lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION: Range = (lambda v: 0 <= v < 1, "in [0, 1)")
SCALE: Range = (lambda v: v >= 2, ">= 2")

_JUDGE: dict[str, Range] = {
    "max_critique_tokens": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "max_length": AT_LEAST_1,
    "max_concurrency": AT_LEAST_1,
    "timeout_s": POSITIVE,
    "deadline_s": POSITIVE,
    "max_retries": NON_NEGATIVE,
    "backoff_s": NON_NEGATIVE,
    "top_logprobs": NON_NEGATIVE,
}

_OPTIM: dict[str, Range] = {
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "max_grad_norm": POSITIVE,
}

RANGES: dict[str, Range] = {
    # model
    "model.tiny.vocab_size": AT_LEAST_1,
    "model.tiny.n_layer": AT_LEAST_1,
    "model.tiny.n_head": AT_LEAST_1,
    "model.tiny.n_embd": AT_LEAST_1,
    "model.tiny.n_positions": AT_LEAST_1,
    "model.tiny.kv_heads": AT_LEAST_1,
    "model.tiny.intermediate": AT_LEAST_1,
    "model.lora.r": NON_NEGATIVE,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": FRACTION,
    # task
    "task.max_operand": NON_NEGATIVE,
    "task.demonstrations": AT_LEAST_1,
    "task.eval_fraction": FRACTION,
    "task.max_prompts": AT_LEAST_1,
    "task.max_prompt_tokens": AT_LEAST_1,
    # sft
    "sft.max_length": AT_LEAST_1,
    "sft.steps": NON_NEGATIVE,
    "sft.batch_size": AT_LEAST_1,
    **{f"sft.{k}": r for k, r in _OPTIM.items()},
    "sft.log_every": AT_LEAST_1,
    # feedback
    "feedback.samples_per_prompt": AT_LEAST_1,
    "feedback.num_prompts": AT_LEAST_1,
    "feedback.noise": NON_NEGATIVE,
    "feedback.annotator_temperature": NON_NEGATIVE,
    "feedback.queue.labels_per_item": POSITIVE,
    "feedback.max_labels": AT_LEAST_1,
    "feedback.queue.wait_seconds": NON_NEGATIVE,
    "feedback.queue.poll_seconds": POSITIVE,
    "feedback.rating_scale": SCALE,
    "feedback.temperature": POSITIVE,
    "feedback.max_new_tokens": AT_LEAST_1,
    "feedback.batch_size": AT_LEAST_1,
    # reward model
    "reward_model.epochs": POSITIVE,
    "reward_model.steps": AT_LEAST_1,
    "reward_model.batch_size": AT_LEAST_1,
    **{f"reward_model.{k}": r for k, r in _OPTIM.items()},
    "reward_model.eval_fraction": FRACTION,
    "reward_model.max_length": AT_LEAST_1,
    "reward_model.normalize_samples": AT_LEAST_1,
    "reward_model.ensemble_size": AT_LEAST_1,
    "reward_model.score_batch_size": AT_LEAST_1,
    "reward_model.log_every": AT_LEAST_1,
    # rl
    "rl.steps": NON_NEGATIVE,
    "rl.prompts_per_step": AT_LEAST_1,
    "rl.samples_per_prompt": AT_LEAST_1,
    "rl.max_new_tokens": AT_LEAST_1,
    "rl.temperature": POSITIVE,
    "rl.top_k": NON_NEGATIVE,
    "rl.top_p": PROBABILITY,
    "rl.kl_coef": NON_NEGATIVE,
    "rl.checkpoint_every": NON_NEGATIVE,
    "rl.keep_checkpoints": NON_NEGATIVE,
    "rl.log_every": AT_LEAST_1,
    "rl.samples_every": NON_NEGATIVE,
    "rl.probe_every": NON_NEGATIVE,
    "rl.select_every": NON_NEGATIVE,
    "rl.select_prompts": AT_LEAST_1,
    "rl.samples_to_log": NON_NEGATIVE,
    "rl.optim.lr": POSITIVE,
    "rl.optim.weight_decay": NON_NEGATIVE,
    "rl.optim.eps": POSITIVE,
    "rl.optim.max_grad_norm": POSITIVE,
    "rl.optim.betas.0": FRACTION,
    "rl.optim.betas.1": FRACTION,
    # algorithm (whichever of these the selected algorithm's node has)
    "algorithm.value_lr": POSITIVE,
    "algorithm.clip_eps": POSITIVE,
    "algorithm.clip_eps_high": POSITIVE,
    "algorithm.value_clip": POSITIVE,
    "algorithm.gamma": UNIT,
    "algorithm.lam": UNIT,
    "algorithm.kl_target": POSITIVE,
    "algorithm.kl_horizon": AT_LEAST_1,
    "algorithm.ppo_epochs": AT_LEAST_1,
    "algorithm.epochs": AT_LEAST_1,
    "algorithm.minibatch_size": AT_LEAST_1,
    "algorithm.grad_accum_steps": AT_LEAST_1,
    # eval
    "eval.num_prompts": AT_LEAST_1,
    "eval.samples_per_prompt": AT_LEAST_1,
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.temperature": POSITIVE,
    "eval.batch_size": AT_LEAST_1,
    "eval.samples_to_show": NON_NEGATIVE,
    **{f"eval.judge.{k}": r for k, r in _JUDGE.items()},
    "eval.judge.fallback_value": UNIT,
    # rewards (the selected ones)
    **{f"reward.critique.judge.{k}": r for k, r in _JUDGE.items()},
    "reward.critique.fallback_value": UNIT,
    "reward.critique.score_scale": POSITIVE,
    "reward.critique.log_every": NON_NEGATIVE,
    "reward.critique.log_samples": NON_NEGATIVE,
    # every selected reward's (learned rewards score in batches of sequences)
    "reward.*.batch_size": AT_LEAST_1,
    "reward.*.max_length": AT_LEAST_1,
    # backend
    "backend.threads": AT_LEAST_1,
    "backend.timeout_s": POSITIVE,
}
"""Dotted key -> allowed range. A list element is addressed by its index (``betas.0``); ``*``
stands for every key of the node before it."""


def _as_config(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    raise TypeError(
        f"check_config_ranges needs a DictConfig or a mapping, got {type(cfg).__name__}"
    )


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, or None when any part of it is absent, null or unresolvable."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, ListConfig | list | tuple):
            if not part.isdigit() or int(part) >= len(node):
                return None
            node = node[int(part)]
        elif isinstance(node, DictConfig | Mapping):
            # ``in`` is False for a missing key and for ``???`` (MISSING) values.
            if part not in node:
                return None
            node = node[part]
        else:
            return None
        if node is None:
            return None
    return node


def _values(cfg: DictConfig) -> Iterator[tuple[str, float, Range]]:
    """``(key, value, range)`` of every numeric value the config has among :data:`RANGES`."""
    for pattern, allowed in RANGES.items():
        for key in _expand(cfg, pattern):
            yield from _checked_value(cfg, key, allowed)


def _expand(cfg: DictConfig, pattern: str) -> list[str]:
    """``pattern`` with its ``*`` replaced by each key of the node before it."""
    head, star, tail = pattern.partition(".*.")
    if not star:
        return [pattern]
    node = _select(cfg, head)
    if not isinstance(node, DictConfig | Mapping):
        return []
    return [f"{head}.{name}.{tail}" for name in node]


def _checked_value(cfg: DictConfig, key: str, allowed: Range) -> Iterator[tuple[str, float, Range]]:
    """``(key, value, range)`` when ``key`` holds a number."""
    try:
        value = _select(cfg, key)
    except OmegaConfBaseException:  # an interpolation that fails is reported where it is read
        return
    # bool is an int, but a flag is not a count; strings are the schema's business.
    if isinstance(value, int | float) and not isinstance(value, bool):
        yield key, float(value), allowed


def check_config_ranges(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the key when a numeric value is out of its range.

    Call it once on the composed config (a ``DictConfig`` or a plain mapping), before any model
    loads: ``alignkit: error: rl.prompts_per_step=0: must be >= 1``.
    """
    config = _as_config(cfg)
    for key, value, (ok, words) in _values(config):
        if not math.isfinite(value) or not ok(value):
            shown = int(value) if value.is_integer() else value
            raise ConfigError(f"{key}={shown}: must be {words}")
    # In range, each value can still be wrong together with the others.
    check_rl_settings(config)


# --------------------------------------------------------------------------------------------
# RL settings that train the wrong thing
# --------------------------------------------------------------------------------------------

RL_FREE_STAGES = frozenset(
    {"sft", "eval", "feedback", "reward_model", "judge", "critique_revision"}
)
"""Stages that sample no RL rollouts, so never read ``rl.*``; every other stage (``rl``,
``pipeline``, one a plugin registers) is checked."""


def require_groups(algorithm: str, group_size: int) -> None:
    """Raise :class:`ConfigError` when ``algorithm``, whose baseline is the other samples of
    the same prompt, gets groups of fewer than 2 samples."""
    if group_size < 2:
        raise ConfigError(
            f"algorithm={algorithm} needs rl.samples_per_prompt >= 2, got groups of "
            f"{group_size}: its baseline is the other samples of the same prompt"
        )


def check_rl_settings(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the key, its value and the fix when the RL settings
    would train something other than what they say (see the module docstring)."""
    config = _as_config(cfg)
    stage = _get(config, "stage")
    if stage is not None and str(stage) in RL_FREE_STAGES:
        return
    _check_truncated_sampling(config)


def check_algorithm_components(
    cfg: Any, registry: Any, needs: AlgorithmNeeds, advantage_hooks: list[str]
) -> None:
    """Raise :class:`ConfigError` when ``algorithm.policy_loss``,
    ``algorithm.preference_loss`` or ``algorithm.advantage_estimator`` names nothing
    registered, or when nothing would set the advantages the algorithm declared (no
    ``advantage`` hook of its own and no estimator).

    ``advantage_hooks``: the active plugins implementing ``advantage``, in call order.
    """
    config = _as_config(cfg)
    stage = _get(config, "stage")
    if stage is not None and str(stage) in RL_FREE_STAGES:
        return
    for key, kind in (
        ("policy_loss", "policy_loss"),
        ("preference_loss", "preference_loss"),
        ("advantage_estimator", "advantage"),
    ):
        name = _get(config, f"algorithm.{key}")
        if name is not None and str(name) not in registry.names(kind):
            known = ", ".join(registry.names(kind)) or "none"
            raise ConfigError(
                f"algorithm.{key}={name}: no {kind} of that name is registered; registered: {known}"
            )
    own = [name for name in advantage_hooks if name != "core"]
    if needs.advantages and not own and _get(config, "algorithm.advantage_estimator") is None:
        known = ", ".join(registry.names("advantage")) or "none"
        raise ConfigError(
            f"algorithm={_get(config, 'algorithm.name')} sets no advantages: it implements no "
            f"advantage hook and algorithm.advantage_estimator is not set (registered: {known})"
        )


def check_algorithm_needs(cfg: Any, needs: AlgorithmNeeds) -> None:
    """Raise :class:`ConfigError` when the RL settings do not fit what the active algorithm
    declared (:class:`~alignkit.needs.AlgorithmNeeds`): fewer samples per prompt than its
    baseline needs, or k1 for a KL it keeps in its loss.

    Run once the plugins are active, before any model loads (and again by the engine).
    """
    config = _as_config(cfg)
    stage = _get(config, "stage")
    if stage is not None and str(stage) in RL_FREE_STAGES:
        return
    name = _get(config, "algorithm.name")
    size = _get(config, "rl.samples_per_prompt")
    if needs.sampling and isinstance(size, int) and size < needs.min_group_size:
        raise ConfigError(
            f"rl.samples_per_prompt={size} with algorithm={name}: its baseline is each "
            f"prompt's group of samples, which needs rl.samples_per_prompt >= "
            f"{needs.min_group_size} (a group of one gives every response advantage 0)"
        )
    # With y ~ pi, E[grad k1] = E[grad log pi(y)] = grad sum_y pi(y) = 0: a k1 term in the
    # loss adds noise and no penalty. In the reward it is right: there it is a return.
    coef = _get(config, "rl.kl_coef")
    estimator = needs.kl_estimator(_get(config, "rl.kl_estimator"))
    if needs.kl_in != "loss" or not isinstance(coef, int | float) or coef == 0:
        return
    if estimator == "k1":
        escape = "or rl.kl_coef=0 (no KL term)"
        if _get(config, "algorithm.kl_in_loss") is True:
            escape = "or algorithm.kl_in_loss=false (KL in the reward, where k1 is right)"
        raise ConfigError(
            f"rl.kl_estimator=k1 with algorithm={name}, which keeps its KL in the loss "
            f"(rl.kl_coef={coef:g}): a k1 KL term in the loss has zero expected gradient "
            "(E[grad log pi] = 0), so it applies no penalty; use rl.kl_estimator=k2 (its "
            "gradient is exactly the gradient of KL(pi || ref)) or k3 (that of KL(ref || pi)), "
            f"or leave it unset (k3 in the loss), {escape}"
        )


def _check_truncated_sampling(cfg: DictConfig) -> None:
    # The rollout records log-probs of the full temperature-scaled distribution (what the
    # update recomputes, so the ratio starts at 1), not of the truncated one it samples from.
    top_k, top_p = _get(cfg, "rl.top_k"), _get(cfg, "rl.top_p")
    truncated = []
    if isinstance(top_k, int) and top_k > 0:
        truncated.append(f"rl.top_k={top_k}")
    if isinstance(top_p, int | float) and top_p < 1:
        truncated.append(f"rl.top_p={top_p}")
    if not truncated or _get(cfg, "rl.allow_truncated_sampling") is True:
        return
    raise ConfigError(
        f"{', '.join(truncated)}: RL rollouts would be sampled from a truncated distribution "
        "while their old log-probs are the full distribution's, so every update is off-policy "
        "by the truncation; use rl.top_k=0 and rl.top_p=1.0, or set "
        "rl.allow_truncated_sampling=true to accept it (as TRL and verl do)"
    )


def _get(cfg: DictConfig, key: str) -> Any:
    """:func:`_select`, with None for a value whose interpolation fails (reported where read)."""
    try:
        return _select(cfg, key)
    except OmegaConfBaseException:
        return None
