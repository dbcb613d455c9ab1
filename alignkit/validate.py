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
* top-k / top-p rollouts, whose recorded old log-probs are the full distribution's;
* one sample per prompt for an algorithm whose baseline is the prompt's group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignkit.errors import ConfigError

__all__ = [
    "GROUP_ALGORITHMS",
    "RANGES",
    "check_config_ranges",
    "check_rl_settings",
    "loss_kl_estimator",
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
    "reward.rm_ensemble.batch_size": AT_LEAST_1,
    "reward.rm_ensemble.max_length": AT_LEAST_1,
    # backend
    "backend.threads": AT_LEAST_1,
    "backend.timeout_s": POSITIVE,
}
"""Dotted key -> allowed range. A list element is addressed by its index (``betas.0``)."""


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
    for key, allowed in RANGES.items():
        try:
            value = _select(cfg, key)
        except OmegaConfBaseException:  # an interpolation that fails is reported where it is read
            continue
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

GROUP_ALGORITHMS: dict[str, str] = {
    "grpo": "each group-standardised advantage is then 0 and nothing trains",
    "rloo": "the leave-one-out baseline then has no other sample to average",
}
"""Algorithms whose baseline is the other samples of the same prompt -> why one is not enough."""


def require_groups(algorithm: str, group_size: int) -> None:
    """Raise :class:`ConfigError` when ``algorithm`` (a :data:`GROUP_ALGORITHMS` key) gets
    groups of fewer than 2 samples; its advantage hook calls it on every batch."""
    if group_size < 2:
        raise ConfigError(
            f"algorithm={algorithm} needs rl.samples_per_prompt >= 2, got groups of "
            f"{group_size}: {GROUP_ALGORITHMS[algorithm]}"
        )


def loss_kl_estimator(cfg: Any) -> tuple[str, str] | None:
    """``(key, estimator)`` of the KL estimate the algorithm puts in its loss, or None when the
    KL is not in the loss (it is in the reward, or ``rl.kl_coef=0`` drops it).

    By convention an algorithm node's own ``kl_estimator`` field estimates a KL term of its
    loss (GRPO), and ``kl_in_loss=true`` moves ``rl.kl_estimator``'s KL from the reward into
    the loss (PPO).
    """
    config = _as_config(cfg)
    coef = _get(config, "rl.kl_coef")
    if isinstance(coef, int | float) and float(coef) == 0:
        return None
    own = _get(config, "algorithm.kl_estimator")
    if own is not None:
        return "algorithm.kl_estimator", str(own)
    if _get(config, "algorithm.kl_in_loss") is True:
        estimator = _get(config, "rl.kl_estimator")
        return ("rl.kl_estimator", str(estimator)) if estimator is not None else None
    return None


def check_rl_settings(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the key, its value and the fix when the RL settings
    would train something other than what they say (see the module docstring)."""
    config = _as_config(cfg)
    stage = _get(config, "stage")
    if stage is not None and str(stage) in RL_FREE_STAGES:
        return
    _check_loss_kl(config)
    _check_truncated_sampling(config)
    _check_group_size(config)


def _check_loss_kl(cfg: DictConfig) -> None:
    # With y ~ pi, E[grad k1] = E[grad log pi(y)] = grad sum_y pi(y) = 0: a k1 term in the loss
    # adds noise and no penalty. In the reward it is right: there it is a return, not a loss.
    found = loss_kl_estimator(cfg)
    if found is None or found[1] != "k1":
        return
    key, _ = found
    if key == "rl.kl_estimator":
        where = "with algorithm.kl_in_loss=true"
        escape = "or algorithm.kl_in_loss=false (KL in the reward, where k1 is right)"
    else:
        name, coef = _get(cfg, "algorithm.name"), _get(cfg, "rl.kl_coef")
        where = f"(algorithm={name}, KL in the loss with rl.kl_coef={coef})"
        escape = "or rl.kl_coef=0 (no KL term)"
    raise ConfigError(
        f"{key}=k1 {where}: a k1 KL term in the loss has zero expected gradient "
        f"(E[grad log pi] = 0), so it applies no penalty; use {key}=k2 (its gradient is "
        f"exactly the gradient of KL(pi || ref)) or k3 (that of KL(ref || pi)), {escape}"
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


def _check_group_size(cfg: DictConfig) -> None:
    name, size = _get(cfg, "algorithm.name"), _get(cfg, "rl.samples_per_prompt")
    if str(name) not in GROUP_ALGORITHMS or not isinstance(size, int) or size >= 2:
        return
    raise ConfigError(
        f"rl.samples_per_prompt={size} with algorithm={name}: the baseline is each prompt's "
        f"group of samples, and {GROUP_ALGORITHMS[str(name)]}; use rl.samples_per_prompt >= 2"
    )


def _get(cfg: DictConfig, key: str) -> Any:
    """:func:`_select`, with None for a value whose interpolation fails (reported where read)."""
    try:
        return _select(cfg, key)
    except OmegaConfBaseException:
        return None
