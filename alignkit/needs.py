"""What an algorithm declares it needs, and what earlier stages hand to the RL run.

An algorithm answers the ``algorithm_needs`` hook with an :class:`AlgorithmNeeds`; the core
answers last with the defaults (an on-policy method that samples, is scored by the configured
rewards and keeps its KL to the reference in the reward). The run is built from it: a
reference policy when the KL needs one or the algorithm asks, the reward phase when the
algorithm is scored, the core's sampling rollout when it samples, and the KL estimator that
fits where the KL enters.

A pipeline's stages hand their outputs to the RL run as typed :class:`Artifacts`
(``ctx.artifacts``), never by writing paths into the config: a learned reward without a
configured path scores with the reward model the pipeline trained, and a critic may start
from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import ConfigError

KL_PLACES = ("reward", "loss", "none")

DEFAULT_KL_ESTIMATOR = {"reward": "k1", "loss": "k3", "none": "k1"}
"""``rl.kl_estimator`` when unset: k1 (``log pi - log ref``) where the KL is a reward penalty,
its sum over a response being the sampled sequence's log-ratio; k3 (``exp(-d) - 1 + d``,
unbiased and >= 0) where it is a loss term, because k1 has zero expected gradient there."""


@dataclass(frozen=True)
class AlgorithmNeeds:
    """What the active algorithm needs from the run (the ``algorithm_needs`` hook)."""

    sampling: bool = True
    """The core samples ``rl.samples_per_prompt`` responses per prompt each step (False: the
    algorithm's ``rollout`` hook supplies the batch, e.g. stored preference pairs). Engine
    metrics that describe the policy's own samples (``gold/score``, sample tables) are only
    logged for sampled batches."""
    reward: bool = True
    """The reward phase scores every batch, and a reward component must be configured. False
    (an offline method): the engine skips the reward phase (an algorithm may still call
    ``ctx.score`` itself)."""
    reference: bool = False
    """A frozen reference policy even at ``rl.kl_coef=0`` (DPO's implicit reward needs one);
    with ``kl_coef > 0`` the run always has one."""
    critic: bool = False
    """The algorithm trains a value model (:mod:`alignkit.rl.critic`): the engine checks that
    the advantage phase set ``values`` and ``returns``."""
    advantages: bool = True
    """The advantage phase sets ``Rollout.advantages`` (checked by the engine)."""
    kl_in: str = "reward"
    """Where the KL to the reference enters: ``reward`` (a per-token penalty, in the shaped
    rewards), ``loss`` (a term of the update's loss) or ``none``. Chooses the default
    ``rl.kl_estimator`` (:data:`DEFAULT_KL_ESTIMATOR`)."""
    min_group_size: int = 1
    """Smallest ``rl.samples_per_prompt`` that makes sense (2 for group baselines: a group of
    one is its own baseline and every advantage is 0); refused at start-up."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """Default weights of reward components the algorithm's own ``reward`` hook returns (DAPO's
    ``overlong`` shaping); ``reward.<name>.weight`` in the config overrides one."""

    def __post_init__(self) -> None:
        if self.kl_in not in KL_PLACES:
            raise ConfigError(
                f"AlgorithmNeeds.kl_in must be one of {KL_PLACES}, got {self.kl_in!r}"
            )

    def kl_estimator(self, configured: Any) -> str:
        """``rl.kl_estimator`` if set, else the default for where the KL enters."""
        if configured is not None and str(configured) not in ("", "None", "null"):
            return str(configured)
        return DEFAULT_KL_ESTIMATOR[self.kl_in]


@dataclass(frozen=True)
class Artifacts:
    """Outputs of earlier stages of the same pipeline, handed to the RL run."""

    sft_policy: Path | None = None
    """The supervised policy folder the RL run starts from."""
    feedback: Path | None = None
    """The feedback folder the reward model was trained on."""
    reward_model: Path | None = None
    """The trained reward-model folder (a folder of ``member_<i>`` folders for an ensemble)."""
