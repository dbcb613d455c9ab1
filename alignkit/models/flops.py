"""Analytic floating-point operation counts of a decoder-only transformer.

Used by the benchmarks to turn measured seconds into achieved GFLOP/s. A multiply-add counts
as 2 FLOPs. For a decoder with ``L`` layers, width ``d``, MLP width ``f`` (4d in GPT-2) and
vocabulary ``V``, one forward pass over a row of ``T`` tokens costs (Kaplan et al. 2020,
Table 1, with the attention term written out)::

    linear     2 * N * T              N = L * (4 d^2 + 2 d f): QKV, output projection, MLP
    attention  L * 4 * T * C * d      scores Q K^T and the weighted sum A V over C context keys

With grouped-query attention (fewer key/value heads) the key and value projections shrink,
and a gated MLP (Llama's ``down(act(gate(x)) * up(x))``) has three ``d x f`` matrices, not
two: :class:`DecoderShape` reads both from the model's config.
    lm head    2 * d * V * K          only for the K positions whose logits are computed

Attention is counted over the full ``T x T`` score matrix the kernels compute for a padded,
masked batch (not the causal half), since that is the work done. A backward pass costs twice
its forward (gradients with respect to inputs and to weights), so a training step over the
same tokens costs three forwards. Layer norms, activations, softmax and the optimizer are
element-wise and are not counted: they are the gap between the FLOP rate and the time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


GATED_MLP_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "cohere",
        "smollm3",
    }
)
"""``model_type`` values whose MLP is gated (``down(act(gate(x)) * up(x))``: three matrices)."""


def _first(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``config`` sets (GPT-2 and Llama-style configs differ)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class DecoderShape:
    """Layers, width, MLP width, heads and vocabulary of a decoder-only transformer."""

    n_layer: int
    n_embd: int
    vocab_size: int
    n_inner: int = 0
    """MLP width; 0 means ``4 * n_embd`` (GPT-2's default)."""
    n_head: int = 0
    """Query heads; 0 means attention is ``n_embd`` wide with as many key/value heads."""
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention); 0 means ``n_head``."""
    head_dim: int = 0
    """Width of one head; 0 means ``n_embd // n_head``."""
    gated_mlp: bool = False
    """Three MLP matrices (gate, up, down) instead of two."""

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From any ``transformers`` decoder config (GPT-2's ``n_layer``/``n_embd`` names or
        the ``num_hidden_layers``/``hidden_size`` names of Llama-style configs)."""
        width = int(_first(config, "hidden_size", "n_embd"))
        heads = int(_first(config, "num_attention_heads", "n_head", default=0))
        return cls(
            n_layer=int(_first(config, "num_hidden_layers", "n_layer")),
            n_embd=width,
            vocab_size=int(config.vocab_size),
            n_inner=int(_first(config, "intermediate_size", "n_inner", default=0)),
            n_head=heads,
            n_kv_head=int(_first(config, "num_key_value_heads", default=heads) or heads),
            head_dim=int(_first(config, "head_dim", default=0) or 0),
            gated_mlp=getattr(config, "model_type", "") in GATED_MLP_TYPES,
        )

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def attn_width(self) -> int:
        """Width of all query heads together (``n_embd`` unless heads are set otherwise)."""
        if not self.n_head:
            return self.n_embd
        return self.n_head * (self.head_dim or self.n_embd // self.n_head)

    @property
    def kv_width(self) -> int:
        """Width of all key (or value) heads together."""
        if not self.n_head:
            return self.n_embd
        return (self.n_kv_head or self.n_head) * (self.head_dim or self.n_embd // self.n_head)

    @property
    def kv_params(self) -> int:
        """Key and value projection weights of one layer."""
        return 2 * self.n_embd * self.kv_width

    @property
    def query_params(self) -> int:
        """Query, output projection and MLP weights of one layer (what a token whose keys and
        values are already computed still needs)."""
        mlp = (3 if self.gated_mlp else 2) * self.n_embd * self.mlp_width
        return 2 * self.n_embd * self.attn_width + mlp

    @property
    def matmul_params(self) -> int:
        """N: weights of the per-token matrix multiplies, embeddings and LM head excluded."""
        return self.n_layer * (self.kv_params + self.query_params)


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
    linear = 2 * shape.matmul_params * seq_len
    attention = 4 * shape.n_layer * seq_len * keys * shape.attn_width
    head = 2 * shape.n_embd * shape.vocab_size * logit_positions
    return float(rows * (linear + attention + head))


def last_token_flops(shape: DecoderShape, rows: int, seq_len: int) -> float:
    """A scalar-head forward that reads one position per row (:mod:`alignkit.models.lean`).

    The first ``L - 1`` layers run over all ``T`` tokens; the last computes keys and values
    for all of them and the rest for the read position only: its query, attention over ``T``
    keys, the output projection and the MLP.
    """
    if shape.n_layer < 1:
        raise ValueError("a decoder needs at least one layer")
    body = replace(shape, n_layer=shape.n_layer - 1)
    last = 2 * shape.kv_params * seq_len + 2 * shape.query_params + 4 * seq_len * shape.attn_width
    return forward_flops(body, rows, seq_len, 0) + float(rows * last)


def packed_forward_flops(
    shape: DecoderShape, tokens: int, rows: int, width: int, logit_positions: int
) -> float:
    """A forward over packed sequences (:mod:`alignkit.models.packing`): the linear layers over the
    ``N`` distinct tokens (``2 N_params N``), attention over the (M, T) layout
    (``4 L M T^2 d``) and ``logit_positions`` LM-head rows (``2 d V`` each)."""
    attention = 4 * shape.n_layer * rows * width * width * shape.attn_width
    head = 2 * shape.n_embd * shape.vocab_size * logit_positions
    return float(2 * shape.matmul_params * tokens + attention + head)


def packed_last_token_flops(shape: DecoderShape, tokens: int, rows: int, width: int) -> float:
    """A scalar-head forward over packed sequences (:mod:`alignkit.models.packing`).

    The linear layers of the first ``L - 1`` layers run over the ``N`` distinct tokens
    (``2 N_layer N``, ``N_layer`` their matmul weights); their attention over the (M, T)
    layout (``4 M T^2 d`` per layer). The last layer computes keys and values for the N
    tokens and the rest at each row's read token, attending over T keys.
    """
    if shape.n_layer < 1:
        raise ValueError("a decoder needs at least one layer")
    body = replace(shape, n_layer=shape.n_layer - 1)
    a = shape.attn_width
    first = 2 * body.matmul_params * tokens + body.n_layer * 4 * rows * width * width * a
    last = 2 * shape.kv_params * tokens + rows * (2 * shape.query_params + 4 * width * a)
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
