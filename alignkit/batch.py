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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

RESPONSE_FIELDS = ("logprobs", "ref_logprobs", "kl", "values", "advantages", "returns")
"""The (B, R) per-token float fields, 0 where masked."""
ROW_FIELDS = ("finished", "rewards")
"""The (B,) per-row fields besides ``group_ids``."""


def _pad_to(x: Tensor, width: int, value: float, left: bool) -> Tensor:
    """(B, W) -> (B, width) padded with ``value`` on the left or the right."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = x.new_full((x.shape[0], extra), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


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
    kl: Tensor | None = None
    """(B, R) float32: per-token estimate of KL(pi_old || ref) at each sampled token under
    ``rl.kl_estimator`` (:func:`alignkit.rl.ops.kl_penalty`), 0 where masked; set by the
    rollout with ``ref_logprobs``, once, for the reward shaping and the ``kl/ref`` metric.
    None without a reference."""
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
    """Free-form per-step data that one algorithm's hooks pass between themselves. A tensor
    whose first dimension is B is a per-row value: :meth:`select` and :meth:`cat` (and the
    gather across ranks) keep it aligned with the rows, padding a (B, R) one like the
    response fields; any other value is kept as is (under FSDP: rank 0's)."""
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
        for name in RESPONSE_FIELDS:
            expect[name] = (b, r)
        expect["kl"] = (b, r)
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

    @property
    def scored(self) -> bool:
        """Whether the batch already holds its rewards (``ctx.score`` ran on it): the engine
        then does not score it again."""
        return self.rewards is not None

    def select(self, rows: Tensor | Sequence[int]) -> Rollout:
        """A new batch of the given rows (a (k,) index or bool mask), in that order.

        Every per-row value follows: tensors, texts, records, reward components and per-row
        extras. Group ids are renumbered 0..n-1, each run of equal ids one group, so a
        selection of whole groups is again a batch of contiguous groups.
        """
        index = torch.as_tensor(rows, device=self.response_ids.device)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.long()
        picked = index.tolist()
        out = dataclasses.replace(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                setattr(out, f.name, value[index])
        _, inverse = torch.unique_consecutive(out.group_ids, return_inverse=True)
        out.group_ids = inverse
        for name in ("prompts", "responses", "records"):
            seq = getattr(self, name)
            setattr(out, name, [seq[i] for i in picked] if seq else [])
        out.reward_components = {k: v[index] for k, v in self.reward_components.items()}
        out.extras = {k: _select_extra(v, index, self.num_rows) for k, v in self.extras.items()}
        out.timings = dict(self.timings)
        return out

    @classmethod
    def cat(cls, parts: Sequence[Rollout], pad_token_id: int = 0) -> Rollout:
        """Concatenate batches of possibly different widths into one.

        Prompts are re-padded on the left to the widest prompt, responses on the right to the
        longest response (mask 0, per-token values 0), so the result has the layout one
        rollout of all the prompts would have. Group ids are offset so that every part's
        groups stay distinct. A field, component or per-row extra is kept when every part
        has it; any other extra keeps the first part's value. Timings are the first part's.
        """
        if not parts:
            raise ValueError("Rollout.cat needs at least one batch")
        width_p = max(p.prompt_ids.shape[1] for p in parts)
        width_r = max(p.response_ids.shape[1] for p in parts)
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += int(part.group_ids.max().item()) + 1 if part.num_rows else 0

        def padded(name: str, value: float, left: bool, width: int) -> Tensor:
            return torch.cat([_pad_to(getattr(p, name), width, value, left) for p in parts])

        merged = cls(
            prompt_ids=padded("prompt_ids", pad_token_id, True, width_p),
            prompt_mask=padded("prompt_mask", 0, True, width_p),
            response_ids=padded("response_ids", pad_token_id, False, width_r),
            response_mask=padded("response_mask", 0, False, width_r),
            group_ids=torch.cat([p.group_ids + o for p, o in zip(parts, offsets, strict=True)]),
            prompts=[t for p in parts for t in p.prompts],
            responses=[t for p in parts for t in p.responses],
            records=[r for p in parts for r in p.records],
            timings=dict(parts[0].timings),
        )
        for name in ROW_FIELDS:
            if all(getattr(p, name) is not None for p in parts):
                setattr(merged, name, torch.cat([getattr(p, name) for p in parts]))
        for name in RESPONSE_FIELDS:
            if all(getattr(p, name) is not None for p in parts):
                setattr(merged, name, padded(name, 0.0, False, width_r))
        for key in parts[0].reward_components:
            if all(key in p.reward_components for p in parts):
                merged.reward_components[key] = torch.cat([p.reward_components[key] for p in parts])
        for key, value in parts[0].extras.items():
            merged.extras[key] = _cat_extra(key, value, parts, width_r)
        return merged


def _select_extra(value: Any, index: Tensor, rows: int) -> Any:
    """A per-row extra (first dimension B) indexed like the rows; anything else as is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[index.to(value.device)]
    return value


def _cat_extra(key: str, first: Any, parts: Sequence[Rollout], width_r: int) -> Any:
    """The concatenation of a per-row extra over ``parts``, else the first part's value."""
    values = [p.extras.get(key) for p in parts]
    per_row = [
        isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == p.num_rows
        for v, p in zip(values, parts, strict=True)
    ]
    if per_row[0] and not all(per_row):
        # Kept whole, the first part's rows would misalign with the joined batch's.
        raise ValueError(f"Rollout.cat: the per-row extra {key!r} is missing from some parts")
    if not all(per_row):
        return first
    per_token = all(
        v.dim() == 2 and v.shape[1] == p.response_ids.shape[1]  # type: ignore[union-attr]
        for v, p in zip(values, parts, strict=True)
    )
    if per_token:  # (B, R) per response token: padded like the response fields
        values = [_pad_to(v, width_r, 0.0, False) for v in values]  # type: ignore[arg-type]
    return torch.cat(values)  # type: ignore[arg-type]
