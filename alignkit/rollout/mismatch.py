"""Training-inference mismatch correction: importance weights between the sampling engine and
the trainer.

When another engine samples (vLLM: other kernels, other precision), the tokens come from the
engine's distribution ``mu`` while the update's ratio is taken against the trainer's own
log-probs at the same weights, ``pi_old``. The policy gradient of the samples is then biased
by ``pi_old / mu``; the per-token importance weight

    w_t = pi_old(y_t | x, y_<t) / mu(y_t | x, y_<t) = exp(log pi_old - log mu)

corrects it. Raw weights have unbounded variance, so the 2026 frameworks bound them:

* ``tis``: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"): ``min(w_t, tis_cap)``;
* ``mis``: masked importance sampling (token level, as IcePop, MiniMax-M1 2025 / Ling 2025):
  weight 1 where ``mis_low <= w_t <= mis_high`` and 0 elsewhere, so tokens the two engines
  disagree on do not train;
* ``seq_mask``: a sequence mask on the geometric mean of a response's weights,
  ``g = exp(mean_t log w_t)``: a whole response is dropped when ``g`` is outside
  ``[seq_low, seq_high]`` (a mismatch that builds up over a long response).

They combine by product (``rollout.correction=tis+seq_mask``). The weights multiply each
token's policy-gradient loss (:func:`alignkit.rl.update.policy_loss`) and carry no gradient.

Metrics (:func:`mismatch_metrics`), over the valid tokens of the batch:

* ``mismatch/kl``: k3 estimate of KL(mu || pi_old), ``E_mu[w - 1 - log w]`` (0 when the
  engines agree; healthy runs in float32 show ~1e-6, bf16 engines ~1e-3);
* ``mismatch/weight_max``, ``mismatch/weight_mean``: of the raw ``w_t``;
* ``mismatch/masked_frac``: tokens whose correction weight is 0;
* ``mismatch/ess``: normalised effective sample size of the corrected weights,
  ``(sum c)^2 / (n sum c^2)`` in (0, 1], 1 when every weight is equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import ConfigError

__all__ = ["CORRECTIONS", "MismatchCorrection", "correction_weights", "mismatch_metrics"]

CORRECTIONS = ("tis", "mis", "seq_mask")
"""The parts a correction is made of (joined with ``+``)."""


@dataclass(frozen=True)
class MismatchCorrection:
    """Which corrections apply and their thresholds (``rollout.*``)."""

    parts: tuple[str, ...] = ("tis",)
    tis_cap: float = 2.0
    mis_low: float = 0.5
    mis_high: float = 2.0
    seq_low: float = 0.5
    seq_high: float = 2.0

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in CORRECTIONS]
        if unknown:
            raise ConfigError(
                f"rollout.correction: unknown part {unknown[0]!r}; known: "
                f"{', '.join(CORRECTIONS)}, joined with '+', or none / auto"
            )
        if self.tis_cap < 1:
            raise ConfigError(f"rollout.tis_cap={self.tis_cap}: must be >= 1")
        for low, high, name in (
            (self.mis_low, self.mis_high, "mis"),
            (self.seq_low, self.seq_high, "seq"),
        ):
            if not 0 < low <= 1 <= high:
                raise ConfigError(
                    f"rollout.{name}_low={low}, rollout.{name}_high={high}: need "
                    "0 < low <= 1 <= high"
                )

    @classmethod
    def from_config(cls, node: Any, engine_is_trainer: bool) -> MismatchCorrection | None:
        """The correction ``rollout.correction`` asks for; None for ``none`` (and for
        ``auto`` when the engine is the trainer, whose log-probs need no correction)."""
        spec = str(node.get("correction", "auto"))
        if spec == "none" or (spec == "auto" and engine_is_trainer):
            return None
        parts = ("tis",) if spec == "auto" else tuple(p for p in spec.split("+") if p)
        return cls(
            parts=parts,
            tis_cap=float(node.get("tis_cap", 2.0)),
            mis_low=float(node.get("mis_low", 0.5)),
            mis_high=float(node.get("mis_high", 2.0)),
            seq_low=float(node.get("seq_low", 0.5)),
            seq_high=float(node.get("seq_high", 2.0)),
        )


def _log_weights(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(B, R) ``log pi_old - log mu``, 0 at padding."""
    return torch.where(mask != 0, trainer_logprobs.float() - engine_logprobs.float(), 0.0)


def correction_weights(
    trainer_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    correction: MismatchCorrection,
) -> Tensor:
    """(B, R) detached weights that multiply each token's policy-gradient loss (0 at padding).

    Args:
        trainer_logprobs: (B, R) log pi_old of the sampled tokens, the trainer's forward at
            the rollout's weights.
        engine_logprobs: (B, R) log mu, what the sampling engine reported.
        mask: (B, R) 1 on response tokens.
        correction: which parts apply (see the module docstring).
    """
    log_w = _log_weights(trainer_logprobs, engine_logprobs, mask)
    valid = mask != 0
    weights = torch.ones_like(log_w)
    if "tis" in correction.parts:
        weights = weights * log_w.exp().clamp(max=correction.tis_cap)
    if "mis" in correction.parts:
        w = log_w.exp()
        keep = (w >= correction.mis_low) & (w <= correction.mis_high)
        weights = weights * keep.float()
    if "seq_mask" in correction.parts:
        lengths = valid.sum(1).clamp(min=1)
        geo = (log_w.sum(1) / lengths).exp()  # (B,) geometric mean of the token weights
        keep = (geo >= correction.seq_low) & (geo <= correction.seq_high)
        weights = weights * keep.float()[:, None]
    return torch.where(valid, weights, 0.0).detach()


def mismatch_metrics(
    trainer_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    weights: Tensor | None,
) -> dict[str, float]:
    """``mismatch/*`` metrics of a batch (see the module docstring); ``weights`` are the
    correction's (None: no correction, the metrics of the raw weights only)."""
    valid = mask != 0
    n = int(valid.sum())
    if n == 0:
        return {}
    log_w = _log_weights(trainer_logprobs, engine_logprobs, mask)[valid]
    w = log_w.exp()
    out = {
        # k3 with x = mu-samples of pi_old/mu: E_mu[w - 1 - log w] = KL(mu || pi_old) >= 0.
        "mismatch/kl": float((w - 1 - log_w).mean()),
        "mismatch/weight_max": float(w.max()),
        "mismatch/weight_mean": float(w.mean()),
    }
    c = w if weights is None else weights[valid]
    out["mismatch/masked_frac"] = float((c == 0).float().mean())
    total = c.sum()
    out["mismatch/ess"] = float(total**2 / (n * (c**2).sum())) if total > 0 else 0.0
    return out
