"""Packed sequences: each distinct token of a batch stored, and computed, once.

Shapes: M = sequences (rows), T = the longest row, N = distinct tokens, d = width.

Why: a reward model's batch is a few prompts, each with several responses (a pair, or a
ranking of K). Padded to one width, the batch makes every linear layer (most of a small
decoder's FLOPs) run over M x T positions: each prompt K times, plus the padding. Packed, the
linear layers run over N distinct real tokens; only attention, a small share of the work at
these lengths, runs on the (M, T) layout gathered from them. On the benchmark's pairs that is
a third fewer tokens than the real ones padded, and on K = 16 rankings about half.

A row is ``prefix + suffix``; rows whose prefixes are the same token sequence share those
tokens. Each token's own query is computed at its ``home`` position, the first row position
holding it; :func:`alignkit.models.lean.packed_last_hidden` runs a decoder over this layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PackedSequences", "pack_sequences"]


@dataclass(frozen=True)
class PackedSequences:
    """M sequences over N distinct tokens."""

    tokens: Tensor
    """(N,) token ids."""
    positions: Tensor
    """(N,) each token's position in its sequence (0-based)."""
    layout: Tensor
    """(M, T) flat index of row m's t-th token; N (one past the last token) after its end."""
    lengths: Tensor
    """(M,) tokens per row."""
    home: Tensor
    """(N,) ``m * T + t`` of the row position that computes token n's query."""

    @property
    def rows(self) -> int:
        return int(self.layout.shape[0])

    def last(self) -> Tensor:
        """(M,) flat index of each row's last token."""
        rows = torch.arange(self.rows, device=self.layout.device)
        return self.layout[rows, self.lengths - 1]

    def padded(self, pad_id: int) -> tuple[Tensor, Tensor]:
        """The same rows as (M, T) right-padded ids and attention mask."""
        ids = torch.cat([self.tokens, self.tokens.new_full((1,), pad_id)])[self.layout]
        width = self.layout.shape[1]
        cols = torch.arange(width, device=self.layout.device)
        mask = (cols[None, :] < self.lengths[:, None]).long()
        return ids, mask

    def to(self, device: torch.device | str) -> PackedSequences:
        return PackedSequences(
            *(t.to(device) for t in (self.tokens, self.positions, self.layout, self.lengths)),
            self.home.to(device),
        )


def pack_sequences(
    prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]]
) -> PackedSequences:
    """Pack rows ``prefixes[m] + suffixes[m]``; equal prefixes are stored once.

    Raises:
        ValueError: lengths differ, or a row is empty.
    """
    if len(prefixes) != len(suffixes):
        raise ValueError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes")
    width = max((len(p) + len(s) for p, s in zip(prefixes, suffixes, strict=True)), default=0)
    tokens: list[int] = []
    positions: list[int] = []
    home: list[int] = []
    rows: list[list[int]] = []
    shared: dict[tuple[int, ...], list[int]] = {}
    for m, (prefix, suffix) in enumerate(zip(prefixes, suffixes, strict=True)):
        if not prefix and not suffix:
            raise ValueError(f"row {m} is empty")
        key = tuple(prefix)
        if key not in shared:
            shared[key] = list(range(len(tokens), len(tokens) + len(key)))
            tokens += key
            positions += range(len(key))
            home += (m * width + t for t in range(len(key)))
        row = list(shared[key])
        for t, token in enumerate(suffix, start=len(key)):
            row.append(len(tokens))
            tokens.append(int(token))
            positions.append(t)
            home.append(m * width + t)
        rows.append(row)
    n = len(tokens)
    layout = torch.full((len(rows), width), n, dtype=torch.long)
    for m, row in enumerate(rows):
        layout[m, : len(row)] = torch.tensor(row, dtype=torch.long)
    return PackedSequences(
        tokens=torch.tensor(tokens, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        layout=layout,
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        home=torch.tensor(home, dtype=torch.long),
    )
