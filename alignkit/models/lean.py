"""Lean decoder forwards: the same maths as ``transformers``' models, less work per call.

Shapes: B = batch, T = new positions of one call (the prompt at prefill, 1 while decoding),
S = cache length (prompt + new tokens), d = width, H = query heads, G = key/value heads,
h = head width, V = vocabulary, N = packed tokens, M = packed rows.

Why: on the small models RL research runs on CPU, a decode step of a ``transformers`` model
costs several times its matmuls (module dispatch, masks and rotary tables rebuilt every call,
a cache grown by concatenation), and a padded training forward runs every prompt K times.
Here the weights are read once, the key/value cache is one preallocated tensor per layer
written in place, the padding mask is built once per batch, and training and scoring run
packed. ``transformers`` has no packed layout that shares a prompt between the K samples of
a group, and on CPU its packed-sequence support (``position_ids`` restarts) needs the
flash-attention kernels; the benchmarks (``--patch hf_decode``, ``--patch padded``) measure
the model's own forward against this path on every architecture it supports.

Supported architectures (the exact ``transformers`` classes, not subclasses): GPT-2
(Radford et al. 2019: learned positions, pre-LN, fused QKV), the Llama family (Touvron et al.
2023: RMSNorm, rotary positions, grouped-query attention, gated MLP) as Llama, Mistral,
Qwen2, Qwen3 (with its per-head query/key norms) and Gemma (scaled embeddings, ``1 + w``
norms), and GPT-NeoX (Black et al. 2022: partial rotary, parallel residual). Each block is
``x + attn(norm_1(x))`` then ``x + mlp(norm_2(x))`` (NeoX's parallel residual:
``x + attn(norm_1(x)) + mlp(norm_2(x))``), causal attention scaled by the model's own factor.

Three uses:

* :func:`lean_decoder` for sampling (:func:`alignkit.models.generation.generate`);
* :func:`last_token_hidden` for reward models, which read one hidden state per row: the
  last block computes keys and values for every position but its query, attention output,
  MLP and final norm only at that row's last token;
* packed forwards (:func:`packed_last_hidden`, :func:`packed_states`, :func:`packed_logits`)
  over :mod:`alignkit.models.packing`'s layout, for training and scoring: each distinct token
  through the linear layers once, so a prompt shared by K samples is computed once and
  padding not at all.

Logits (sampling and packed) come from an LM head run in float32 with autocast off
(:func:`alignkit.rl.ops.float32_linear`): under bf16 autocast the body runs in bf16 as the
model's own forward does, but the logits are not rounded to bf16 on top of that.

All return None for anything they cannot reproduce exactly (another architecture or a
subclass, LoRA or FSDP wrappers, quantised layers, active dropout, rotary scalings that
depend on the sequence length, a context past a sliding window, a forward hook that may
change outputs), and the caller then runs the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.models.flops import (
    DecoderShape,
    forward_flops,
    last_token_flops,
    packed_forward_flops,
    packed_last_token_flops,
)
from alignkit.models.packing import PackedSequences
from alignkit.rl.ops import float32_linear

__all__ = [
    "LeanDecoder",
    "call_observers",
    "last_token_hidden",
    "lean_decoder",
    "observe_only",
    "packed_last_hidden",
    "packed_logits",
    "packed_states",
    "supports",
]

Observer = Callable[[nn.Module, float], None]
call_observers: list[Observer] = []
"""Called after every lean forward with ``(trunk, flops)``: the base model (``GPT2Model``,
``LlamaModel``, ...) whose weights ran and the analytic FLOPs of the call
(:mod:`alignkit.models.flops`; the LM head included). Module hooks do not run in the lean path;
the benchmarks count FLOPs with this instead."""

_OBSERVE_ONLY = "_alignkit_observe_only"

Rope = tuple[Tensor, Tensor] | None
"""Rotary ``(cos, sin)``, each (..., r) over the positions of a call, or None (GPT-2)."""


def _report_call(trunk: nn.Module, flops: float) -> None:
    """Tell every observer in :data:`call_observers` about one lean call."""
    for observer in call_observers:
        observer(trunk, flops)


def observe_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a forward hook as one that only observes, so it does not disable the lean path.

    A model with any other forward hook (one that may change outputs, such as a logit bias)
    runs its own forward, where the hook runs. Marked hooks do not run in the lean path;
    register an observer in :data:`call_observers` to see those calls.
    """
    setattr(hook, _OBSERVE_ONLY, True)
    return hook


# --------------------------------------------------------------------------------------------
# Building blocks read from the model's modules (views of its weights, never copies)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    """``x @ weight.T + bias`` over any leading dims; ``weight`` is (out, in)."""

    weight: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def float32(self, x: Tensor) -> Tensor:
        """This layer in float32 with autocast off (an LM head: no bf16 logits)."""
        return float32_linear(x, self.weight, self.bias)

    def as_float32(self) -> _Linear:
        """The same layer with float32 weights (no copy when they already are float32)."""
        bias = None if self.bias is None else self.bias.float()
        return _Linear(self.weight.float(), bias)

    def rows(self, start: int, stop: int) -> _Linear:
        """The output features ``start:stop`` (a slice of a fused projection)."""
        bias = None if self.bias is None else self.bias[start:stop]
        return _Linear(self.weight[start:stop], bias)


def _linear(module: nn.Module) -> _Linear | None:
    """An ``nn.Linear`` (exactly: LoRA, quantised and other wrappers are not) as a _Linear."""
    if type(module) is not nn.Linear:
        return None
    return _Linear(module.weight, module.bias)


_LLAMA_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
_GEMMA_NORMS = frozenset({"GemmaRMSNorm"})


@dataclass(frozen=True)
class _Norm:
    """A layer norm (with bias), Llama's RMSNorm (``w * norm(x)``) or Gemma's
    (``(1 + w) * norm(x)``, computed in float32 before the cast back)."""

    kind: str
    weight: Tensor
    bias: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        width = (self.weight.shape[0],)
        if self.kind == "layer":
            return F.layer_norm(x, width, self.weight, self.bias, self.eps)
        if x.dtype == torch.float32:
            weight = self.weight + 1.0 if self.kind == "gemma" else self.weight
            return F.rms_norm(x, width, weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "gemma":
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


def _norm(module: nn.Module) -> _Norm | None:
    """The norm ``module`` computes, or None for a kind the lean maths does not know."""
    if type(module) is nn.LayerNorm:
        if not module.elementwise_affine:
            return None
        return _Norm("layer", module.weight, module.bias, float(module.eps))
    name = type(module).__name__
    if not type(module).__module__.startswith("transformers."):
        return None
    if name in _LLAMA_NORMS:
        return _Norm("llama", module.weight, None, float(module.variance_epsilon))
    if name in _GEMMA_NORMS:
        return _Norm("gemma", module.weight, None, float(module.eps))
    return None


def _rotate(x: Tensor, rope: Rope) -> Tensor:
    """Rotary embedding (Su et al. 2021, Eq. 34, in the rotate-half layout of ``transformers``)
    of (..., heads, h) ``x`` at ``rope``'s positions (each (..., r)); with r < h only the
    first r features rotate (GPT-NeoX's partial rotary)."""
    if rope is None:
        return x
    cos, sin = (t.unsqueeze(-2) for t in rope)
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([_rotate(x[..., :rot], rope), x[..., rot:]], dim=-1)
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _rope_at(rope: Rope, pick: Callable[[Tensor], Tensor]) -> Rope:
    """``rope`` with ``pick`` applied to both tables (e.g. selecting the read positions)."""
    return None if rope is None else (pick(rope[0]), pick(rope[1]))


_STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
"""Rotary scalings whose angles depend on the position only, so a table is exact."""


def _rotary_module(trunk: nn.Module) -> nn.Module | None:
    """The trunk's rotary embedding, if its angles depend on the position only."""
    rotary = getattr(trunk, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
        return None
    return rotary


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class _Arch:
    """The maths of one base model (a ``GPT2Model``, ``LlamaModel``, ...) over its weights.

    Every method works on any leading dims: (B, T, d) batches and (N, d) packed tokens.
    """

    module: nn.Module
    shape: DecoderShape
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    scale: float
    window: int | None = None
    """Sliding-window length: the lean maths attends to every earlier key, so it is exact
    only for contexts shorter than this."""

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """(...) ids and positions -> (..., d)."""
        raise NotImplementedError

    def rope(self, positions: Tensor) -> Rope:
        """Rotary ``(cos, sin)`` at (...) ``positions``, each (..., r); None without rotary."""
        return None

    def query(self, i: int, x: Tensor, rope: Rope) -> Tensor:
        """Layer ``i``'s (..., H, h) queries of the (..., d) residual stream ``x``."""
        raise NotImplementedError

    def key_value(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s (..., G, h) keys and values."""
        raise NotImplementedError

    def qkv(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values together (one matmul where the weights are fused)."""
        return (self.query(i, x, rope), *self.key_value(i, x, rope))

    def finish(self, i: int, x: Tensor, att: Tensor) -> Tensor:
        """Residual stream after layer ``i``, given its (..., H * h) attention output."""
        raise NotImplementedError

    def final_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def fits(self, context: int) -> bool:
        """Whether a context of ``context`` positions is within the model's sliding window."""
        return self.window is None or context < self.window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Scaled dot-product attention of (B, H, T, h) queries over (B, G, S, h) keys."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.kv_heads != self.heads
        )

    def report(self, flops: float) -> None:
        _report_call(self.module, flops)


@dataclass(frozen=True)
class _GPT2Layer:
    ln_1: _Norm
    qkv: _Linear  # fused (3d, d): queries, keys, values
    proj: _Linear
    ln_2: _Norm
    fc: _Linear
    out: _Linear
    act: nn.Module


class _GPT2(_Arch):
    """GPT-2: learned positions, LayerNorm, fused QKV in ``Conv1D`` (stored (in, out))."""

    def __init__(self, trunk: nn.Module, layers: list[_GPT2Layer]) -> None:
        cfg = trunk.config
        self.module, self.blocks = trunk, layers
        self.shape = DecoderShape.from_config(cfg)
        self.heads = self.kv_heads = int(cfg.n_head)
        self.width = int(cfg.n_embd)
        self.head_dim = self.width // self.heads
        self.layers = len(layers)
        self.scale = self.head_dim**-0.5
        self.wte, self.wpe = trunk.wte.weight, trunk.wpe.weight
        self.ln_f = _Norm(
            "layer", trunk.ln_f.weight, trunk.ln_f.bias, float(cfg.layer_norm_epsilon)
        )

    @classmethod
    def build(cls, trunk: nn.Module) -> _GPT2 | None:
        from transformers.pytorch_utils import Conv1D

        cfg = trunk.config
        if (
            not getattr(cfg, "scale_attn_weights", True)
            or getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
            or getattr(cfg, "reorder_and_upcast_attn", False)
            or getattr(cfg, "add_cross_attention", False)
            or cfg.n_embd % cfg.n_head
        ):
            return None
        layers = []
        eps = float(cfg.layer_norm_epsilon)
        for b in trunk.h:
            convs = (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
            if any(type(c) is not Conv1D for c in convs):
                return None
            qkv, proj, fc, out = (_Linear(c.weight.t(), c.bias) for c in convs)
            layers.append(
                _GPT2Layer(
                    ln_1=_Norm("layer", b.ln_1.weight, b.ln_1.bias, eps),
                    qkv=qkv,
                    proj=proj,
                    ln_2=_Norm("layer", b.ln_2.weight, b.ln_2.bias, eps),
                    fc=fc,
                    out=out,
                    act=b.mlp.act,
                )
            )
        return cls(trunk, layers)

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim)

    def query(self, i: int, x: Tensor, rope: Rope) -> Tensor:
        blk = self.blocks[i]
        return self._heads(blk.qkv.rows(0, self.width)(blk.ln_1(x)))

    def key_value(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        blk = self.blocks[i]
        kv = blk.qkv.rows(self.width, 3 * self.width)(blk.ln_1(x))
        k, v = kv.view(*x.shape[:-1], 2, self.heads, self.head_dim).unbind(-3)
        return k, v

    def qkv(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        blk = self.blocks[i]
        qkv = blk.qkv(blk.ln_1(x)).view(*x.shape[:-1], 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(-3)
        return q, k, v

    def finish(self, i: int, x: Tensor, att: Tensor) -> Tensor:
        blk = self.blocks[i]
        x = x + blk.proj(att)
        return x + blk.out(blk.act(blk.fc(blk.ln_2(x))))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.ln_f(x)


@dataclass(frozen=True)
class _LlamaLayer:
    norm_1: _Norm
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    norm_2: _Norm
    gate: _Linear
    up: _Linear
    down: _Linear
    act: nn.Module
    q_norm: _Norm | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: _Norm | None


class _Llama(_Arch):
    """The Llama family: RMSNorm, rotary, grouped-query attention, gated MLP
    ``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2, Qwen3, Gemma)."""

    def __init__(self, trunk: nn.Module, layers: list[_LlamaLayer], norm: _Norm) -> None:
        cfg = trunk.config
        attn = trunk.layers[0].self_attn
        self.module, self.blocks, self.norm = trunk, layers, norm
        self.shape = DecoderShape.from_config(cfg)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(attn.head_dim)
        self.layers = len(layers)
        self.scale = float(attn.scaling)
        self.window = getattr(cfg, "sliding_window", None)
        self.rotary = trunk.rotary_emb
        self.embedding = trunk.embed_tokens.weight
        # Gemma scales its embeddings by sqrt(d), in the weights' dtype.
        scale = getattr(trunk.embed_tokens, "embed_scale", None)
        self.embed_scale = None if scale is None else scale.to(self.embedding.dtype)

    @classmethod
    def build(cls, trunk: nn.Module) -> _Llama | None:
        cfg = trunk.config
        if _rotary_module(trunk) is None or len(trunk.layers) != cfg.num_hidden_layers:
            return None
        if type(trunk.embed_tokens) is not nn.Embedding and not hasattr(
            trunk.embed_tokens, "embed_scale"
        ):
            return None
        layers = []
        for b in trunk.layers:
            attn, mlp = b.self_attn, b.mlp
            parts = {
                "q": _linear(attn.q_proj),
                "k": _linear(attn.k_proj),
                "v": _linear(attn.v_proj),
                "o": _linear(attn.o_proj),
                "gate": _linear(mlp.gate_proj),
                "up": _linear(mlp.up_proj),
                "down": _linear(mlp.down_proj),
                "norm_1": _norm(b.input_layernorm),
                "norm_2": _norm(b.post_attention_layernorm),
            }
            qk = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
            qk_norms = [None if m is None else _norm(m) for m in qk]
            if any(p is None for p in parts.values()) or any(
                m is not None and n is None for m, n in zip(qk, qk_norms, strict=True)
            ):
                return None
            if set(b._modules) - {
                "self_attn",
                "mlp",
                "input_layernorm",
                "post_attention_layernorm",
            }:
                return None  # extra per-layer modules (e.g. Gemma 2's post-norms)
            layers.append(
                _LlamaLayer(**parts, act=mlp.act_fn, q_norm=qk_norms[0], k_norm=qk_norms[1])
            )
        norm = _norm(trunk.norm)
        return None if norm is None else cls(trunk, layers, norm)

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        x = F.embedding(ids, self.embedding)
        return x if self.embed_scale is None else x * self.embed_scale

    def rope(self, positions: Tensor) -> Rope:
        flat = positions.reshape(1, -1)
        cos, sin = self.rotary(self.embedding[:1], flat)
        return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim)

    def query(self, i: int, x: Tensor, rope: Rope) -> Tensor:
        blk = self.blocks[i]
        q = self._heads(blk.q(blk.norm_1(x)))
        return _rotate(q if blk.q_norm is None else blk.q_norm(q), rope)

    def key_value(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        blk = self.blocks[i]
        a = blk.norm_1(x)
        k = self._heads(blk.k(a))
        k = _rotate(k if blk.k_norm is None else blk.k_norm(k), rope)
        return k, self._heads(blk.v(a))

    def qkv(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        blk = self.blocks[i]
        a = blk.norm_1(x)
        q, k, v = self._heads(blk.q(a)), self._heads(blk.k(a)), self._heads(blk.v(a))
        if blk.q_norm is not None and blk.k_norm is not None:
            q, k = blk.q_norm(q), blk.k_norm(k)
        return _rotate(q, rope), _rotate(k, rope), v

    def finish(self, i: int, x: Tensor, att: Tensor) -> Tensor:
        blk = self.blocks[i]
        x = x + blk.o(att)
        m = blk.norm_2(x)
        return x + blk.down(blk.act(blk.gate(m)) * blk.up(m))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)


@dataclass(frozen=True)
class _NeoXLayer:
    norm_1: _Norm
    qkv: _Linear  # fused per head: (H * 3h, d), each head's [q, k, v] together
    dense: _Linear
    norm_2: _Norm
    fc: _Linear
    out: _Linear
    act: nn.Module


class _NeoX(_Arch):
    """GPT-NeoX (Pythia): LayerNorm, partial rotary, per-head fused QKV, and (by default)
    the parallel residual ``x + attn(ln_1(x)) + mlp(ln_2(x))``."""

    def __init__(self, trunk: nn.Module, layers: list[_NeoXLayer], norm: _Norm) -> None:
        cfg = trunk.config
        self.module, self.blocks, self.norm = trunk, layers, norm
        self.shape = DecoderShape.from_config(cfg)
        self.heads = self.kv_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.layers = len(layers)
        self.scale = float(trunk.layers[0].attention.scaling)
        self.parallel = bool(cfg.use_parallel_residual)
        self.rotary = trunk.rotary_emb
        self.embedding = trunk.embed_in.weight

    @classmethod
    def build(cls, trunk: nn.Module) -> _NeoX | None:
        if _rotary_module(trunk) is None or type(trunk.embed_in) is not nn.Embedding:
            return None
        layers = []
        for b in trunk.layers:
            parts = {
                "norm_1": _norm(b.input_layernorm),
                "qkv": _linear(b.attention.query_key_value),
                "dense": _linear(b.attention.dense),
                "norm_2": _norm(b.post_attention_layernorm),
                "fc": _linear(b.mlp.dense_h_to_4h),
                "out": _linear(b.mlp.dense_4h_to_h),
            }
            if any(p is None for p in parts.values()):
                return None
            layers.append(_NeoXLayer(**parts, act=b.mlp.act))
        norm = _norm(trunk.final_layer_norm)
        return None if norm is None else cls(trunk, layers, norm)

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return F.embedding(ids, self.embedding)

    def rope(self, positions: Tensor) -> Rope:
        cos, sin = self.rotary(self.embedding[:1], positions.reshape(1, -1))
        return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)

    def qkv(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        blk = self.blocks[i]
        qkv = blk.qkv(blk.norm_1(x)).view(*x.shape[:-1], self.heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        return _rotate(q, rope), _rotate(k, rope), v

    def query(self, i: int, x: Tensor, rope: Rope) -> Tensor:
        return self.qkv(i, x, rope)[0]

    def key_value(self, i: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        _, k, v = self.qkv(i, x, rope)
        return k, v

    def finish(self, i: int, x: Tensor, att: Tensor) -> Tensor:
        blk = self.blocks[i]
        att = blk.dense(att)
        if self.parallel:
            return x + att + blk.out(blk.act(blk.fc(blk.norm_2(x))))
        x = x + att
        return x + blk.out(blk.act(blk.fc(blk.norm_2(x))))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)


_ARCHS: dict[str, Callable[[nn.Module], _Arch | None]] = {
    "GPT2Model": _GPT2.build,
    "LlamaModel": _Llama.build,
    "MistralModel": _Llama.build,
    "Qwen2Model": _Llama.build,
    "Qwen3Model": _Llama.build,
    "GemmaModel": _Llama.build,
    "GPTNeoXModel": _NeoX.build,
}
"""Base-model class name -> the lean maths for it (``transformers``' own classes only)."""


def _transformers_class(module: nn.Module, names: Any) -> bool:
    """``module`` is exactly one of ``transformers``' classes ``names`` (not a subclass)."""
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def _dropout_active(trunk: nn.Module) -> bool:
    """Whether a forward in the trunk's current mode would drop anything."""
    if not trunk.training:
        return False
    for m in trunk.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        # Attention modules that read a float rate at call time (Llama's attention_dropout).
        if any("dropout" in k and isinstance(v, float) and v > 0 for k, v in vars(m).items()):
            return True
    return False


def _arch(trunk: nn.Module) -> _Arch | None:
    """The lean maths of a base model, or None where it would not be exact (hooks aside:
    callers check them on the module they run in place of)."""
    if not _transformers_class(trunk, _ARCHS) or _dropout_active(trunk):
        return None
    if any(p.is_meta for p in trunk.parameters()):
        return None
    return _ARCHS[type(trunk).__name__](trunk)


def _lm(model: nn.Module) -> tuple[_Arch, _Linear] | None:
    """The lean maths of a causal LM and its LM head, or None."""
    if not isinstance(model, nn.Module) or not type(model).__module__.startswith(
        "transformers.models."
    ):
        return None
    name = type(model).__name__
    if not (name.endswith("ForCausalLM") or name == "GPT2LMHeadModel"):
        return None
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or _has_hooks(model):
        return None
    trunk = getattr(model, "base_model", None)
    head = _linear(model.get_output_embeddings())
    if trunk is None or trunk is model or head is None:
        return None
    arch = _arch(trunk)
    return None if arch is None else (arch, head)


def supports(model: nn.Module) -> bool:
    """Whether ``model`` (a causal LM or a base model) runs on the lean path."""
    if _lm(model) is not None:
        return True
    return _arch(model) is not None and not _has_hooks(model)


# --------------------------------------------------------------------------------------------
# Sampling: a preallocated KV cache
# --------------------------------------------------------------------------------------------


class LeanDecoder:
    """Decode-time view of a causal LM: its weights and a preallocated KV cache."""

    def __init__(self, arch: _Arch, head: _Linear) -> None:
        self.arch = arch
        self.head = head
        self.head32: _Linear | None = None  # the head in float32, for one rollout
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []
        self.key_ok: Tensor | None = None  # (B, S) bool: key position holds a real token
        self.cos: Tensor | None = None  # (S, r) rotary tables by position
        self.sin: Tensor | None = None
        self.length = 0

    def start(self, batch: int, capacity: int, prompt_mask: Tensor) -> None:
        """Allocate the cache for ``capacity`` positions; ``prompt_mask`` is (B, P)."""
        a = self.arch
        shape = (batch, a.kv_heads, capacity, a.head_dim)
        dtype, device = self.head.weight.dtype, self.head.weight.device
        # Half-precision weights are cast once per rollout here, not at every decode step.
        self.head32 = self.head.as_float32()
        self.k_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in range(a.layers)]
        self.v_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in range(a.layers)]
        # Generated positions are always attended to (finished rows decode padding that no
        # one reads); only the prompt's left padding is masked.
        self.key_ok = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.key_ok[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        # Positions never exceed the column index, so a table of `capacity` rows covers all.
        rope = a.rope(torch.arange(capacity, device=device))
        self.cos, self.sin = (None, None) if rope is None else rope
        self.length = 0

    def _rope(self, positions: Tensor) -> Rope:
        if self.cos is None or self.sin is None:
            return None
        return self.cos[positions], self.sin[positions]

    def _mask(self, new: int, rows: Tensor | None = None) -> Tensor:
        """(B, 1, T, S') bool attention mask for ``new`` positions after ``self.length``
        (of the cache rows ``rows`` only, if given)."""
        assert self.key_ok is not None
        end = self.length + new
        key_ok = self.key_ok if rows is None else self.key_ok[rows]
        keys = key_ok[:, None, None, :end]
        if new == 1:
            return keys
        return _causal(keys, self.length, end)

    def forward(self, ids: Tensor, positions: Tensor, last_only: bool = True) -> Tensor:
        """Logits for (B, T) ``ids`` at (B, T) ``positions``, appending T cache entries.

        Returns:
            (B, V) float32 logits of the last position if ``last_only``, else (B, T, V).
        """
        return self._forward(ids, positions, last_only, None)

    def prefill(self, ids: Tensor, positions: Tensor) -> Tensor:
        """(B, V) float32 last-position logits of the (B, P) prompts, filling the cache from 0.

        Equal prompt rows (the samples of one prompt, repeated for a group) are computed once
        and their keys and values copied to each of their cache rows: a prompt's cache
        entries depend only on its own tokens and mask.
        """
        assert self.key_ok is not None and self.length == 0
        bsz, width = ids.shape
        rows = torch.cat([ids, self.key_ok[:, :width].to(ids.dtype)], dim=1)
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if distinct.shape[0] == bsz:
            return self._forward(ids, positions, True, None)
        # One row of each distinct prompt (any of its copies: they are equal).
        first = torch.empty(distinct.shape[0], dtype=torch.long, device=ids.device)
        first[inverse] = torch.arange(bsz, device=ids.device)
        logits = self._forward(ids[first], positions[first], True, (first, inverse))
        return logits.index_select(0, inverse)

    def _forward(
        self,
        ids: Tensor,
        positions: Tensor,
        last_only: bool,
        expand: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """:meth:`forward` of (U, T) ``ids``; with ``expand = (first, inverse)`` the U rows
        are the cache rows ``first`` (U,) and fill every cache row b from row ``inverse[b]``."""
        a = self.arch
        bsz, new = ids.shape
        mask = self._mask(new, None if expand is None else expand[0])
        start, end = self.length, self.length + new
        x = a.embed(ids, positions)
        rope = self._rope(positions)
        for i in range(a.layers):
            q, k, v = (t.transpose(1, 2) for t in a.qkv(i, x, rope))  # (B, heads, T, h)
            if expand is None:
                self.k_cache[i][:, :, start:end] = k
                self.v_cache[i][:, :, start:end] = v
                k, v = self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end]
            else:  # a prefill (start = 0): attend within the U rows, copy out to B
                self.k_cache[i][:, :, :end] = k.index_select(0, expand[1])
                self.v_cache[i][:, :, :end] = v.index_select(0, expand[1])
            att = a.attend(q, k, v, mask).transpose(1, 2).reshape(bsz, new, -1)
            x = a.finish(i, x, att)
        self.length = end
        if last_only:
            x = x[:, -1]
        assert self.head32 is not None, "start() allocates the cache and the float32 head"
        logits = self.head32.float32(a.final_norm(x))
        if call_observers:
            positions_out = bsz if last_only else bsz * new
            a.report(forward_flops(a.shape, bsz, new, 0, context=end) + _head(a, positions_out))
        return logits


def _head(a: _Arch, positions: int) -> float:
    return 2.0 * a.shape.n_embd * a.shape.vocab_size * positions


def _causal(keys: Tensor, start: int, end: int) -> Tensor:
    """(B, 1, end-start, end) causal mask over the (B, 1, 1, end) real-key mask ``keys``.

    A left-padding query would attend to nothing (NaN through the softmax, then into the next
    layer's keys); letting it see itself keeps every value finite, as ``transformers`` does.
    """
    q = torch.arange(start, end, device=keys.device)[:, None]
    k = torch.arange(end, device=keys.device)[None, :]
    return (keys & (k <= q)) | (k == q)


def lean_decoder(model: nn.Module, context: int | None = None) -> LeanDecoder | None:
    """A :class:`LeanDecoder` over ``model``'s weights, or None where it would not be exact
    (see the module docstring); ``context`` is the longest sequence it will decode."""
    found = _lm(model)
    if found is None or (context is not None and not found[0].fits(context)):
        return None
    return LeanDecoder(*found)


# --------------------------------------------------------------------------------------------
# Scoring and training: last-token and packed forwards, with autograd
# --------------------------------------------------------------------------------------------


def _trunk_arch(trunk: nn.Module, context: int) -> _Arch | None:
    if _has_hooks(trunk):
        return None
    arch = _arch(trunk)
    return arch if arch is not None and arch.fits(context) else None


def last_token_hidden(
    trunk: nn.Module, input_ids: Tensor, attention_mask: Tensor, index: Tensor
) -> Tensor | None:
    """Final hidden state (after the final norm) of each row at position ``index``: (B, d).

    Args:
        trunk: a base model (a reward or value model's backbone).
        input_ids: (B, T) ids, any padding side.
        attention_mask: (B, T), 1 on real tokens.
        index: (B,) the position to read in each row (its last real token).

    Returns:
        (B, d) with autograd, equal to ``trunk(...).last_hidden_state[b, index[b]]`` to float
        rounding; None where the lean maths would not be exact (the caller runs the forward).
        Positions come from the mask (``cumsum - 1``), as :func:`position_ids_from_mask`.
    """
    bsz, total = input_ids.shape
    a = _trunk_arch(trunk, total)
    if a is None:
        return None
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    keys = attention_mask.bool()[:, None, None, :]
    x = a.embed(input_ids, positions)
    rope = a.rope(positions)
    for i in range(a.layers - 1):
        q, k, v = (t.transpose(1, 2) for t in a.qkv(i, x, rope))
        att = a.attend(q, k, v, _causal(keys, 0, total))
        x = a.finish(i, x, att.transpose(1, 2).reshape(bsz, total, -1))
    # Last layer: keys and values everywhere, everything else at the read position only.
    last = a.layers - 1
    k, v = (t.transpose(1, 2) for t in a.key_value(last, x, rope))
    rows = torch.arange(bsz, device=x.device)
    x_last = x[rows, index][:, None]  # (B, 1, d)
    q = a.query(last, x_last, _rope_at(rope, lambda t: t[rows, index][:, None]))
    columns = torch.arange(total, device=x.device)[None, :]
    sees = (keys[:, 0, 0] & (columns <= index[:, None])) | (columns == index[:, None])
    att = a.attend(q.transpose(1, 2), k, v, sees[:, None, None, :])
    out = a.final_norm(a.finish(last, x_last, att.transpose(1, 2).reshape(bsz, 1, -1)))[:, 0]
    if call_observers:
        a.report(last_token_flops(a.shape, bsz, total))
    return out


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for a (..) integer ``index`` into dim 0 of ``x``: (.., *x.shape[1:]).

    Through ``index_select``, whose backward adds rows with ``index_add_``. Advanced indexing
    gives the same values, but its backward is ``index_put_`` with accumulation, which the CPU
    runs serially element by element: about 6x slower for a packed batch's gathers, and 19% of
    a packed micro-batch's forward and backward at 2 threads in the profile.
    """
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


class _PackedAttention:
    """Attention over a packed batch: per-token q, k, v gathered into the (M, T) row layout."""

    def __init__(self, a: _Arch, packed: PackedSequences) -> None:
        self.arch = a
        self.packed = packed
        self.rows, self.width = packed.layout.shape
        cols = torch.arange(self.width, device=packed.layout.device)
        self.real = cols[None, :] < packed.lengths[:, None]  # (M, T) key holds a real token
        # Padding queries see themselves only (finite values nobody reads), as in _causal.
        causal = cols[None, :] <= cols[:, None]
        eye = torch.eye(self.width, dtype=torch.bool, device=cols.device)
        self.mask = (self.real[:, None, None, :] & causal) | eye  # (M, 1, T, T)
        # Slots past a row's end read token 0 instead of a zero row appended to every q, k
        # and v (a copy of each): those keys are masked out and those queries' outputs are
        # never read, so they change no value and receive zero gradient.
        self.index = torch.where(self.real, packed.layout, 0)

    def rows_of(self, flat: Tensor) -> Tensor:
        """(N, heads, h) -> (M, heads, T, h); past each row's end, token 0's entries (masked)."""
        return _take(flat, self.index).transpose(1, 2)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(N, H, h) queries and (N, G, h) keys and values -> (N, H * h): every token's
        output read at its home position."""
        att = self.arch.attend(self.rows_of(q), self.rows_of(k), self.rows_of(v), self.mask)
        return _take(att.transpose(1, 2).reshape(self.rows * self.width, -1), self.packed.home)


def _packed_blocks(a: _Arch, attention: _PackedAttention, rope: Rope, layers: int) -> Tensor:
    """(N, d) residual stream after the first ``layers`` layers: linear layers and norms
    once per token."""
    packed = attention.packed
    x = a.embed(packed.tokens, packed.positions)
    for i in range(layers):
        x = a.finish(i, x, attention(*a.qkv(i, x, rope)))
    return x


def packed_last_hidden(trunk: nn.Module, packed: PackedSequences) -> Tensor | None:
    """Final hidden state (after the final norm) at each packed row's last token: (M, d).

    The linear layers and norms run once per distinct token (N of them, see
    :mod:`alignkit.models.packing`); attention gathers each row's queries, keys and values into the
    (M, T) layout, and every token's output is read back from its home position. As in
    :func:`last_token_hidden`, the last layer runs its query, attention output and MLP only
    at the read tokens. Equal to the padded forward's ``last_hidden_state`` at each row's
    last token to float rounding, with autograd; None where the lean maths would not be exact.
    """
    a = _trunk_arch(trunk, int(packed.layout.shape[1]))
    if a is None:
        return None
    attention = _PackedAttention(a, packed)
    rope = a.rope(packed.positions)
    x = _packed_blocks(a, attention, rope, a.layers - 1)
    last = a.layers - 1
    k, v = a.key_value(last, x, rope)
    read = packed.last()  # (M,)
    x_last = _take(x, read)  # (M, d)
    q = a.query(last, x_last, _rope_at(rope, lambda t: _take(t, read)))
    att = a.attend(
        q[:, :, None],
        attention.rows_of(k),
        attention.rows_of(v),
        attention.real[:, None, None, :],  # the last token sees its whole row
    )
    out = a.final_norm(a.finish(last, x_last, att.reshape(packed.rows, -1)))
    if call_observers:
        tokens = int(packed.tokens.numel())
        a.report(packed_last_token_flops(a.shape, tokens, attention.rows, attention.width))
    return out


def _packed_states(a: _Arch, packed: PackedSequences, read: Tensor) -> Tensor:
    attention = _PackedAttention(a, packed)
    hidden = a.final_norm(
        _packed_blocks(a, attention, a.rope(packed.positions), a.layers)
    )  # (N, d)
    if call_observers:
        tokens = int(packed.tokens.numel())
        a.report(packed_forward_flops(a.shape, tokens, attention.rows, attention.width, 0))
    return _take(torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])]), read)


def packed_states(trunk: nn.Module, packed: PackedSequences, read: Tensor) -> Tensor | None:
    """Final hidden states (after the final norm) of a base model at the packed tokens ``read``.

    Args:
        trunk: a base model (a policy's, a value model's backbone).
        packed: the sequences (:mod:`alignkit.models.packing`).
        read: (...) flat token indices; N (one past the last token) reads zeros, for
            positions the caller masks out.

    Returns:
        (..., d) with autograd, equal to the padded forward's to float rounding; None where
        the lean maths would not be exact.
    """
    a = _trunk_arch(trunk, int(packed.layout.shape[1]))
    return None if a is None else _packed_states(a, packed, read)


def packed_logits(model: nn.Module, packed: PackedSequences, read: Tensor) -> Tensor | None:
    """(..., V) float32 logits of a causal LM at the packed tokens ``read``.

    Only the read positions go through the LM head, in float32 with autocast off (see the
    module docstring); see :func:`packed_states`. None where the lean maths would not be
    exact (see :func:`lean_decoder`).
    """
    found = _lm(model)
    if found is None or not found[0].fits(int(packed.layout.shape[1])):
        return None
    a, head = found
    hidden = _packed_states(a, packed, read)
    if call_observers:
        a.report(_head(a, read.numel()))
    return head.float32(hidden)


def _has_hooks(model: nn.Module) -> bool:
    """Whether a forward hook that is not :func:`observe_only` could see or change a call."""
    from torch.nn.modules import module as torch_module

    global_hooks = (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
    )
    if any(len(hooks) for hooks in global_hooks):
        return True
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            if any(not getattr(h, _OBSERVE_ONLY, False) for h in hooks.values()):
                return True
    return False
