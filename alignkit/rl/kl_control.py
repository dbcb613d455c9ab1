"""KL coefficient controllers: a fixed beta, or the adaptive one of Ziegler et al. (2019).

The adaptive controller (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", Sec. 2.2) steers the measured KL to the reference towards a target::

    e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1  = beta_t * (1 + e_t * n_t / horizon)

where ``KL_t`` is the mean per-sequence KL of the step's batch and ``n_t`` its number of
samples, so ``horizon`` is measured in samples. The only state is beta, kept JSON-able in
``ctx.state[KL_STATE_KEY]`` so that checkpoints save and restore it with no extra code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from alignkit.errors import ConfigError

__all__ = [
    "KL_CONTROLLERS",
    "KL_STATE_KEY",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "build_kl_controller",
    "kl_controller_from_state",
    "save_kl_controller",
]

KL_STATE_KEY = "kl_control"
"""Key of the controller's JSON-able state in ``RunContext.state``."""


class KLController(Protocol):
    """A source of the KL coefficient beta that may react to the measured KL."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Account for a batch of ``n_steps`` samples with mean KL ``current_kl``; new beta."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class FixedKLController:
    """beta never changes."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "coef": self.coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coef = float(state["coef"])


@dataclass
class AdaptiveKLController:
    """Proportional control of beta towards ``target`` nats per sequence (Ziegler et al. 2019).

    Attributes:
        coef: the current beta (initially ``rl.kl_coef``).
        target: the KL per sequence to aim for, in nats.
        horizon: samples over which a persistent 20% error changes beta by about e^0.2.
    """

    coef: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ConfigError(
                f"adaptive KL control needs target > 0 and horizon > 0, "
                f"got target={self.target}, horizon={self.horizon}"
            )

    def update(self, current_kl: float, n_steps: int) -> float:
        # The error is clipped so that one outlier batch cannot move beta by more than 20%.
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "coef": self.coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coef = float(state["coef"])


KL_CONTROLLERS: dict[str, Callable[[float, float, int], KLController]] = {
    "fixed": lambda coef, target, horizon: FixedKLController(coef),
    "adaptive": lambda coef, target, horizon: AdaptiveKLController(coef, target, horizon),
}
"""Controller kinds selectable by name (``algorithm.kl_ctl``)."""


def build_kl_controller(
    kind: str, init_coef: float, *, target: float = 6.0, horizon: int = 10_000
) -> KLController:
    """A fresh controller of ``kind`` (``"fixed"`` or ``"adaptive"``) starting at ``init_coef``."""
    try:
        factory = KL_CONTROLLERS[kind]
    except KeyError:
        raise ConfigError(
            f"unknown KL controller {kind!r}; expected one of {sorted(KL_CONTROLLERS)}"
        ) from None
    return factory(float(init_coef), float(target), int(horizon))


def kl_controller_from_state(
    state: Mapping[str, Any],
    kind: str,
    init_coef: float,
    *,
    target: float = 6.0,
    horizon: int = 10_000,
) -> KLController:
    """A controller of ``kind``, with beta restored from ``state[KL_STATE_KEY]`` when present.

    ``state`` is ``RunContext.state``; after a resume it holds the checkpointed beta.
    """
    controller = build_kl_controller(kind, init_coef, target=target, horizon=horizon)
    saved = state.get(KL_STATE_KEY)
    if saved is not None:
        controller.load_state_dict(saved)
    return controller


def save_kl_controller(state: dict[str, Any], controller: KLController) -> None:
    """Write the controller's JSON-able state into ``RunContext.state``."""
    state[KL_STATE_KEY] = controller.state_dict()
