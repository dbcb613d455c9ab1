"""Range checks of numeric config values, run once after composition and before any model loads.

The structured configs check names and types; they cannot say that ``rl.prompts_per_step=0``
or ``rl.top_p=1.5`` is meaningless. Without this check such a value fails only after the model
has loaded, deep inside a hook, with a message that does not name the key (or, worse, it runs:
an RL step with no prompts, a division by a zero ``log_every``).

:func:`check_config_ranges` raises :class:`~alignkit.errors.ConfigError` naming the first key
out of range and the allowed range. Keys absent from the config (another algorithm's node, a
reward that is not selected) and null values (``null`` means "derive it") are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignkit.errors import ConfigError

__all__ = ["RANGES", "check_config_ranges"]

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
