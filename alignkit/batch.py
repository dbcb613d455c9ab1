"""The `Rollout` batch: the one object that flows through the four phase hooks.

Shapes use these letters:

* ``N`` - number of distinct prompts in the step,
* ``G`` - samples per prompt (the group size), so ``B = N * G`` rows,
* ``P`` - prompt length (left-padded), ``R`` - response length (right-padded).

Rows of the same prompt are contiguous and share a ``group_ids`` value, so group-based
algorithms (GRPO, RLOO) can compute per-prompt baselines with nothing more than
``rewards.view(N, G)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One step's samples and everything the phases compute about them.

    Filled by the ``rollout`` hook (prompt/response tensors, sampling log-probs), then the
    ``reward`` hooks (``rewards`` and ``reward_components``), then ``advantage``
    (``advantages``, ``returns``); ``update`` reads it all.
    """

    prompt_ids: Tensor
    """(B, P) int64: prompt tokens, left-padded with the pad id."""
    prompt_mask: Tensor
    """(B, P) int64: 1 for real prompt tokens, 0 for left padding."""
    response_ids: Tensor
    """(B, R) int64: sampled tokens, right-padded; every token after the first EOS is pad."""
    response_mask: Tensor
    """(B, R) float32: 1 for real response tokens, the EOS token included; 0 after it."""
    group_ids: Tensor
    """(B,) int64: index of the prompt (0..N-1) each row was sampled from."""
    prompts: list[str] = field(default_factory=list)
    """B prompt texts, as shown to the model."""
    responses: list[str] = field(default_factory=list)
    """B decoded response texts (no EOS, no padding)."""
    records: list[Any] = field(default_factory=list)
    """B task records (e.g. :class:`alignkit.tasks.PromptRecord`) that reward plugins read."""
    finished: Tensor | None = None
    """(B,) bool: True when the response emitted EOS before the length limit."""
    logprobs: Tensor | None = None
    """(B, R) float32: log-probs of the response tokens under the sampling policy, taken once
    at generation time from ``logits / temperature``; 0 where masked."""
    ref_logprobs: Tensor | None = None
    """(B, R) float32: the same tokens under the frozen reference policy (None if no KL)."""
    values: Tensor | None = None
    """(B, R) float32: value estimates per response token (critic-based methods only)."""
    rewards: Tensor | None = None
    """(B,) float32: the combined sequence reward, ``sum_k weight_k * component_k``."""
    reward_components: dict[str, Tensor] = field(default_factory=dict)
    """Name -> (B,) float32 raw (unweighted) score of each reward component."""
    advantages: Tensor | None = None
    """(B, R) float32: per-token advantages, 0 where masked."""
    returns: Tensor | None = None
    """(B, R) float32: value targets (critic-based methods only)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Free-form per-step data that one algorithm's hooks pass between themselves."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds this process spent in named parts of a phase, keyed by metric name (the core
    rollout's ``time/rollout/generation`` and ``time/rollout/ref``). The engine logs them
    beside the phase times; they are parts of a phase, so ``time/step`` does not add them."""

    @property
    def num_rows(self) -> int:
        """B, the number of (prompt, response) rows."""
        return int(self.response_ids.shape[0])

    @property
    def group_size(self) -> int:
        """G, the samples per prompt (rows are grouped contiguously)."""
        num_groups = int(self.group_ids.max().item()) + 1 if self.num_rows else 1
        return self.num_rows // num_groups

    def sequences(self) -> tuple[Tensor, Tensor]:
        """(B, P + R) input ids and attention mask for a forward over prompt and response."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)
        return ids, mask

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose shape disagrees with the others."""
        b, r = self.response_ids.shape
        expect: dict[str, tuple[int, ...]] = {
            "prompt_mask": tuple(self.prompt_ids.shape),
            "response_mask": (b, r),
            "group_ids": (b,),
            "prompt_ids": (b, self.prompt_ids.shape[1]),
        }
        for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
            expect[name] = (b, r)
        expect["rewards"] = (b,)
        expect["finished"] = (b,)
        for f in fields(self):
            value = getattr(self, f.name)
            wrong = isinstance(value, Tensor) and tuple(value.shape) != expect.get(f.name, ())
            if f.name in expect and wrong:
                raise ValueError(
                    f"Rollout.{f.name} has shape {tuple(value.shape)}, expected {expect[f.name]}"
                )
        for name, comp in self.reward_components.items():
            if tuple(comp.shape) != (b,):
                raise ValueError(
                    f"reward component {name!r} has shape {tuple(comp.shape)}, expected ({b},)"
                )
        for name in ("prompts", "responses", "records"):
            seq = getattr(self, name)
            if seq and len(seq) != b:
                raise ValueError(f"Rollout.{name} has {len(seq)} entries, expected {b}")
