"""Analytic floating-point operation counts of a GPT-2 style decoder.

Used by the benchmarks to turn measured seconds into achieved GFLOP/s. A multiply-add counts
as 2 FLOPs. For a decoder with ``L`` layers, width ``d``, MLP width ``f`` (4d in GPT-2) and
vocabulary ``V``, one forward pass over a row of ``T`` tokens costs (Kaplan et al. 2020,
Table 1, with the attention term written out)::

    linear     2 * N * T              N = L * (4 d^2 + 2 d f): QKV, output projection, MLP
    attention  L * 4 * T * C * d      scores Q K^T and the weighted sum A V over C context keys
    lm head    2 * d * V * K          only for the K positions whose logits are computed

Attention is counted over the full ``T x T`` score matrix the kernels compute for a padded,
masked batch (not the causal half), since that is the work done. A backward pass costs twice
its forward (gradients with respect to inputs and to weights), so a training step over the
same tokens costs three forwards. Layer norms, activations, softmax and the optimizer are
element-wise and are not counted: they are the gap between the FLOP rate and the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DecoderShape",
    "decode_flops",
    "forward_flops",
    "last_token_flops",
    "packed_forward_flops",
    "packed_last_token_flops",
    "train_flops",
]


@dataclass(frozen=True)
class DecoderShape:
    """Layers, width, MLP width and vocabulary of a decoder-only transformer."""

    n_layer: int
    n_embd: int
    vocab_size: int
    n_inner: int = 0
    """MLP width; 0 means ``4 * n_embd`` (GPT-2's default)."""

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a ``transformers`` GPT-2 style config (``n_layer``, ``n_embd``, ``n_inner``)."""
        return cls(
            n_layer=int(config.n_layer),
            n_embd=int(config.n_embd),
            vocab_size=int(config.vocab_size),
            n_inner=int(getattr(config, "n_inner", None) or 0),
        )

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def matmul_params(self) -> int:
        """N: weights of the per-token matrix multiplies, embeddings and LM head excluded."""
        d = self.n_embd
        return self.n_layer * (4 * d * d + 2 * d * self.mlp_width)


def forward_flops(
    shape: DecoderShape,
    rows: int,
    seq_len: int,
    logit_positions: int,
    context: int | None = None,
) -> float:
    """FLOPs of one forward pass over ``rows`` sequences of ``seq_len`` new tokens.

    Args:
        shape: the decoder.
        rows: B, sequences in the batch.
        seq_len: T, tokens per row processed in this call.
        logit_positions: K, positions per row that go through the LM head (0 for a value or
            reward model's scalar head, whose ``2 d`` per token is negligible and omitted).
        context: C, keys each query attends over (the KV-cache length while decoding);
            ``None`` means ``seq_len``.

    Returns:
        ``B * (2 N T + 4 L T C d + 2 d V K)``.
    """
    keys = seq_len if context is None else context
    d = shape.n_embd
    linear = 2 * shape.matmul_params * seq_len
    attention = 4 * shape.n_layer * seq_len * keys * d
    head = 2 * d * shape.vocab_size * logit_positions
    return float(rows * (linear + attention + head))


def last_token_flops(shape: DecoderShape, rows: int, seq_len: int) -> float:
    """A scalar-head forward that reads one position per row (:mod:`alignkit.lean_gpt2`).

    The first ``L - 1`` layers run over all ``T`` tokens; the last computes keys and values
    for all of them (``2 * 2 d^2 * T``) and the rest for the read position only: its QKV
    (``6 d^2``), attention over ``T`` keys (``4 T d``), output projection (``2 d^2``) and MLP
    (``4 d f``).
    """
    if shape.n_layer < 1:
        raise ValueError("a decoder needs at least one layer")
    d, f = shape.n_embd, shape.mlp_width
    body = DecoderShape(shape.n_layer - 1, d, shape.vocab_size, shape.n_inner)
    last = 4 * d * d * seq_len + 6 * d * d + 4 * seq_len * d + 2 * d * d + 4 * d * f
    return forward_flops(body, rows, seq_len, 0) + float(rows * last)


def packed_forward_flops(
    shape: DecoderShape, tokens: int, rows: int, width: int, logit_positions: int
) -> float:
    """A forward over packed sequences (:mod:`alignkit.packing`): the linear layers over the
    ``N`` distinct tokens (``2 N_params N``), attention over the (M, T) layout
    (``4 L M T^2 d``) and ``logit_positions`` LM-head rows (``2 d V`` each)."""
    d = shape.n_embd
    attention = 4 * shape.n_layer * rows * width * width * d
    return float(
        2 * shape.matmul_params * tokens + attention + 2 * d * shape.vocab_size * logit_positions
    )


def packed_last_token_flops(shape: DecoderShape, tokens: int, rows: int, width: int) -> float:
    """A scalar-head forward over packed sequences (:mod:`alignkit.packing`).

    The linear layers of the first ``L - 1`` layers run over the ``N`` distinct tokens
    (``2 N_layer N``, ``N_layer`` their matmul weights); their attention over the (M, T)
    layout (``4 M T^2 d`` per layer). The last layer computes keys and values for the N
    tokens (``4 d^2 N``) and the rest at each row's read token, attending over T keys.
    """
    if shape.n_layer < 1:
        raise ValueError("a decoder needs at least one layer")
    d, f = shape.n_embd, shape.mlp_width
    body = DecoderShape(shape.n_layer - 1, d, shape.vocab_size, shape.n_inner)
    first = 2 * body.matmul_params * tokens + body.n_layer * 4 * rows * width * width * d
    last = 4 * d * d * tokens + rows * (6 * d * d + 4 * width * d + 2 * d * d + 4 * d * f)
    return float(first + last)


def train_flops(shape: DecoderShape, rows: int, seq_len: int, logit_positions: int) -> float:
    """Forward plus backward (twice the forward) of one training pass: 3 forwards."""
    return 3.0 * forward_flops(shape, rows, seq_len, logit_positions)


def decode_flops(shape: DecoderShape, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Sampling ``new_tokens`` after a ``prompt_len`` prompt with a KV cache.

    The prefill is one forward over the prompt with logits at its last position; each later
    token is a one-position forward attending over the cache (prompt plus tokens so far).
    Step ``t`` (1-based) of the ``new_tokens - 1`` cached steps attends over ``P + t`` keys.
    """
    total = forward_flops(shape, rows, prompt_len, logit_positions=1)
    for step in range(1, new_tokens):
        total += forward_flops(shape, rows, 1, logit_positions=1, context=prompt_len + step)
    return total
