"""Lean GPT-2 forwards: the same maths as ``transformers``' GPT-2, less work per call.

Shapes: B = batch, T = new positions of one call (the prompt at prefill, 1 while decoding),
S = cache length (prompt + new tokens), d = width, H = heads, h = d / H, V = vocabulary.

Why: on the small models RL research runs on CPU, a decode step of ``transformers``' GPT-2
costs several times its matmuls (module dispatch, a mask rebuilt every call, a cache grown by
concatenation). Here the weights are read once, the key/value cache is one preallocated
tensor per layer written in place, and the padding mask is built once per batch. The forward
is Radford et al. (2019)'s pre-LN block, identical to ``GPT2Block`` in eval mode:
``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, causal attention scaled by 1/sqrt(h).

Three uses:

* :func:`lean_decoder` for sampling (:func:`alignkit.generation.generate`);
* :func:`last_token_hidden` for reward models, which read one hidden state per row: the
  last block computes keys and values for every position but its query, attention output,
  MLP and final layer norm only at that row's last token, so the work of the last block's
  other positions (most of a quarter of a 4-layer model's forward and backward) is skipped;
* packed forwards (:func:`packed_last_hidden`, :func:`packed_states`,
  :func:`packed_logits`) over :mod:`alignkit.packing`'s layout, for training and scoring:
  each distinct token through the linear layers once, so a prompt shared by K samples is
  computed once and padding not at all.

All return None for anything they cannot reproduce exactly (another architecture, LoRA or
FSDP wrappers, active dropout, attention variants, a forward hook that may change outputs),
and the caller then runs the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.flops import (
    DecoderShape,
    forward_flops,
    last_token_flops,
    packed_forward_flops,
    packed_last_token_flops,
)
from alignkit.packing import PackedSequences

__all__ = [
    "LeanGPT2",
    "call_observers",
    "last_token_hidden",
    "lean_decoder",
    "observe_only",
    "packed_last_hidden",
    "packed_logits",
    "packed_states",
]

Observer = Callable[[nn.Module, float], None]
call_observers: list[Observer] = []
"""Called after every lean forward with ``(trunk, flops)``: the ``GPT2Model`` whose weights
ran and the analytic FLOPs of the call (:mod:`alignkit.flops`; the LM head included). Module
hooks do not run in the lean path; the benchmarks count FLOPs with this instead."""

_OBSERVE_ONLY = "_alignkit_observe_only"


def _report_call(trunk: nn.Module, flops: float) -> None:
    """Tell every observer in :data:`call_observers` about one lean call."""
    for observer in call_observers:
        observer(trunk, flops)


def observe_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a forward hook as one that only observes, so it does not disable the lean path.

    A model with any other forward hook (one that may change outputs, such as a logit bias)
    is decoded through its own forward, where the hook runs. Marked hooks do not run in the
    lean path; register an observer in :data:`call_observers` to see those calls.
    """
    setattr(hook, _OBSERVE_ONLY, True)
    return hook


@dataclass(frozen=True)
class _Block:
    ln1_w: Tensor
    ln1_b: Tensor
    qkv_w: Tensor  # (d, 3d): GPT-2's Conv1D stores (in, out)
    qkv_b: Tensor
    proj_w: Tensor  # (d, d)
    proj_b: Tensor
    ln2_w: Tensor
    ln2_b: Tensor
    fc_w: Tensor  # (d, f)
    fc_b: Tensor
    out_w: Tensor  # (f, d)
    out_b: Tensor


def _block(b: nn.Module) -> _Block:
    """The weights of one ``GPT2Block`` (views, not copies)."""
    attn, mlp = b.attn, b.mlp
    return _Block(
        ln1_w=b.ln_1.weight,
        ln1_b=b.ln_1.bias,
        qkv_w=attn.c_attn.weight,
        qkv_b=attn.c_attn.bias,
        proj_w=attn.c_proj.weight,
        proj_b=attn.c_proj.bias,
        ln2_w=b.ln_2.weight,
        ln2_b=b.ln_2.bias,
        fc_w=mlp.c_fc.weight,
        fc_b=mlp.c_fc.bias,
        out_w=mlp.c_proj.weight,
        out_b=mlp.c_proj.bias,
    )


class _Trunk:
    """The weights of a ``GPT2Model`` (shared, not copied) and the block maths over them."""

    def __init__(self, trunk: nn.Module) -> None:
        cfg = trunk.config
        self.module = trunk
        self.shape = DecoderShape.from_config(cfg)
        self.heads = int(cfg.n_head)
        self.width = int(cfg.n_embd)
        self.eps = float(cfg.layer_norm_epsilon)
        # The module the blocks call (``fuse_tanh_gelu`` may have swapped the config's).
        self.act = trunk.h[0].mlp.act
        self.wte = trunk.wte.weight
        self.wpe = trunk.wpe.weight
        self.lnf_w, self.lnf_b = trunk.ln_f.weight, trunk.ln_f.bias
        self.blocks = [_block(b) for b in trunk.h]

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """(B, T) ids and positions -> (B, T, d)."""
        return F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)

    def qkv(self, blk: _Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d) residual stream -> q, k, v, each (B, H, T, h)."""
        bsz, new = x.shape[:2]
        a = F.layer_norm(x, (self.width,), blk.ln1_w, blk.ln1_b, self.eps)
        qkv = torch.addmm(blk.qkv_b, a.reshape(-1, self.width), blk.qkv_w)
        q, k, v = qkv.view(bsz, new, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def finish(self, blk: _Block, x: Tensor, att: Tensor) -> Tensor:
        """Residual stream after the attention output ``att`` (B, H, T, h) and the MLP."""
        bsz, new = x.shape[:2]
        att = att.transpose(1, 2).reshape(-1, self.width)
        x = x + torch.addmm(blk.proj_b, att, blk.proj_w).view(bsz, new, self.width)
        m = F.layer_norm(x, (self.width,), blk.ln2_w, blk.ln2_b, self.eps)
        m = self.act(torch.addmm(blk.fc_b, m.reshape(-1, self.width), blk.fc_w))
        return x + torch.addmm(blk.out_b, m, blk.out_w).view(bsz, new, self.width)

    def qkv_flat(self, blk: _Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, d) tokens -> q, k, v, each (N, H, h)."""
        a = F.layer_norm(x, (self.width,), blk.ln1_w, blk.ln1_b, self.eps)
        qkv = torch.addmm(blk.qkv_b, a, blk.qkv_w)
        q, k, v = qkv.view(-1, 3, self.heads, self.width // self.heads).unbind(1)
        return q, k, v

    def finish_flat(self, blk: _Block, x: Tensor, att: Tensor) -> Tensor:
        """(N, d) residual stream after the (N, d) attention output ``att`` and the MLP."""
        x = x + torch.addmm(blk.proj_b, att, blk.proj_w)
        m = F.layer_norm(x, (self.width,), blk.ln2_w, blk.ln2_b, self.eps)
        return x + torch.addmm(blk.out_b, self.act(torch.addmm(blk.fc_b, m, blk.fc_w)), blk.out_w)

    def final_norm(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.width,), self.lnf_w, self.lnf_b, self.eps)

    def report(self, flops: float) -> None:
        _report_call(self.module, flops)


class LeanGPT2:
    """Decode-time view of a ``GPT2LMHeadModel``: its weights and a preallocated KV cache."""

    def __init__(self, model: nn.Module) -> None:
        self.trunk = _Trunk(model.transformer)
        self.lm_head = model.lm_head.weight  # (V, d), tied to wte in GPT-2
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []
        self.key_ok: Tensor | None = None  # (B, S) bool: key position holds a real token
        self.length = 0

    def start(self, batch: int, capacity: int, prompt_mask: Tensor) -> None:
        """Allocate the cache for ``capacity`` positions; ``prompt_mask`` is (B, P)."""
        t = self.trunk
        shape = (batch, t.heads, capacity, t.width // t.heads)
        dtype, device = t.wte.dtype, t.wte.device
        self.k_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in t.blocks]
        self.v_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in t.blocks]
        # Generated positions are always attended to (finished rows decode padding that no
        # one reads); only the prompt's left padding is masked.
        self.key_ok = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.key_ok[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        self.length = 0

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
            (B, V) logits of the last position if ``last_only``, else (B, T, V).
        """
        return self._forward(ids, positions, last_only, None)

    def prefill(self, ids: Tensor, positions: Tensor) -> Tensor:
        """(B, V) last-position logits of the (B, P) prompts, filling the cache from 0.

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
        t = self.trunk
        bsz, new = ids.shape
        mask = self._mask(new, None if expand is None else expand[0])
        start, end = self.length, self.length + new
        x = t.embed(ids, positions)
        for i, blk in enumerate(t.blocks):
            q, k, v = t.qkv(blk, x)
            if expand is None:
                self.k_cache[i][:, :, start:end] = k
                self.v_cache[i][:, :, start:end] = v
                k, v = self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end]
            else:  # a prefill (start = 0): attend within the U rows, copy out to B
                self.k_cache[i][:, :, :end] = k.index_select(0, expand[1])
                self.v_cache[i][:, :, :end] = v.index_select(0, expand[1])
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = t.finish(blk, x, att)
        self.length = end
        if last_only:
            x = x[:, -1]
        logits = t.final_norm(x) @ self.lm_head.t()
        if call_observers:
            positions_out = bsz if last_only else bsz * new
            t.report(forward_flops(t.shape, bsz, new, 0, context=end) + _head(t, positions_out))
        return logits


def _head(t: _Trunk, positions: int) -> float:
    return 2.0 * t.width * t.shape.vocab_size * positions


def _causal(keys: Tensor, start: int, end: int) -> Tensor:
    """(B, 1, end-start, end) causal mask over the (B, 1, 1, end) real-key mask ``keys``.

    A left-padding query would attend to nothing (NaN through the softmax, then into the next
    layer's keys); letting it see itself keeps every value finite, as ``transformers`` does.
    """
    q = torch.arange(start, end, device=keys.device)[:, None]
    k = torch.arange(end, device=keys.device)[None, :]
    return (keys & (k <= q)) | (k == q)


def last_token_hidden(
    trunk: nn.Module, input_ids: Tensor, attention_mask: Tensor, index: Tensor
) -> Tensor | None:
    """Final hidden state (after ``ln_f``) of each row at position ``index``: (B, d).

    Args:
        trunk: a ``GPT2Model`` (a reward or value model's backbone).
        input_ids: (B, T) ids, any padding side.
        attention_mask: (B, T), 1 on real tokens.
        index: (B,) the position to read in each row (its last real token).

    Returns:
        (B, d) with autograd, equal to ``trunk(...).last_hidden_state[b, index[b]]`` to float
        rounding; None when ``trunk`` is not a plain GPT-2 (the caller runs its forward).
        Positions come from the mask (``cumsum - 1``), as :func:`position_ids_from_mask`.
    """
    if not _plain_trunk(trunk) or _has_hooks(trunk):
        return None
    t = _Trunk(trunk)
    bsz, total = input_ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    keys = attention_mask.bool()[:, None, None, :]
    x = t.embed(input_ids, positions)
    for blk in t.blocks[:-1]:
        q, k, v = t.qkv(blk, x)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(keys, 0, total))
        x = t.finish(blk, x, att)
    # Last block: keys and values everywhere, everything else at the read position only.
    blk = t.blocks[-1]
    _, k, v = t.qkv(blk, x)
    rows = torch.arange(bsz, device=x.device)
    x_last = x[rows, index][:, None]  # (B, 1, d)
    q, _, _ = t.qkv(blk, x_last)
    columns = torch.arange(total, device=x.device)[None, :]
    sees = (keys[:, 0, 0] & (columns <= index[:, None])) | (columns == index[:, None])
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=sees[:, None, None, :])
    out = t.final_norm(t.finish(blk, x_last, att))[:, 0]
    if call_observers:
        t.report(last_token_flops(t.shape, bsz, total))
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

    def __init__(self, t: _Trunk, packed: PackedSequences) -> None:
        self.packed = packed
        self.heads, self.size = t.heads, t.width // t.heads
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
        """(N, H, h) -> (M, H, T, h); past each row's end, token 0's entries (masked)."""
        return _take(flat, self.index).transpose(1, 2)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(N, H, h) each -> (N, d): every token's output read at its home position."""
        att = F.scaled_dot_product_attention(
            self.rows_of(q), self.rows_of(k), self.rows_of(v), attn_mask=self.mask
        )
        return _take(att.transpose(1, 2).reshape(self.rows * self.width, -1), self.packed.home)


def _packed_blocks(t: _Trunk, attention: _PackedAttention, blocks: list[_Block]) -> Tensor:
    """(N, d) residual stream after ``blocks``: linear layers and norms once per token."""
    packed = attention.packed
    x = t.embed(packed.tokens, packed.positions)
    for blk in blocks:
        x = t.finish_flat(blk, x, attention(*t.qkv_flat(blk, x)))
    return x


def packed_last_hidden(trunk: nn.Module, packed: PackedSequences) -> Tensor | None:
    """Final hidden state (after ``ln_f``) at each packed row's last token: (M, d).

    The linear layers and layer norms run once per distinct token (N of them, see
    :mod:`alignkit.packing`); attention gathers each row's queries, keys and values into the
    (M, T) layout, and every token's output is read back from its home position. As in
    :func:`last_token_hidden`, the last block runs its query, attention output and MLP only at
    the read tokens. Equal to the padded forward's ``last_hidden_state`` at each row's last
    token to float rounding, with autograd; None where the lean maths would not be exact.
    """
    if not _plain_trunk(trunk) or _has_hooks(trunk):
        return None
    t = _Trunk(trunk)
    attention = _PackedAttention(t, packed)
    x = _packed_blocks(t, attention, t.blocks[:-1])
    blk = t.blocks[-1]
    _, k, v = t.qkv_flat(blk, x)
    x_last = _take(x, packed.last())  # (M, d)
    q, _, _ = t.qkv_flat(blk, x_last)
    att = F.scaled_dot_product_attention(
        q[:, :, None],
        attention.rows_of(k),
        attention.rows_of(v),
        attn_mask=attention.real[:, None, None, :],  # the last token sees its whole row
    )
    out = t.final_norm(t.finish_flat(blk, x_last, att.reshape(packed.rows, t.width)))
    if call_observers:
        tokens = int(packed.tokens.numel())
        t.report(packed_last_token_flops(t.shape, tokens, attention.rows, attention.width))
    return out


def packed_states(trunk: nn.Module, packed: PackedSequences, read: Tensor) -> Tensor | None:
    """Final hidden states (after ``ln_f``) of a ``GPT2Model`` at the packed tokens ``read``.

    Args:
        trunk: a plain GPT-2 backbone (a policy's ``transformer``, a value model's backbone).
        packed: the sequences (:mod:`alignkit.packing`).
        read: (...) flat token indices; N (one past the last token) reads zeros, for
            positions the caller masks out.

    Returns:
        (..., d) with autograd, equal to the padded forward's to float rounding; None where
        the lean maths would not be exact.
    """
    if not _plain_trunk(trunk) or _has_hooks(trunk):
        return None
    t = _Trunk(trunk)
    attention = _PackedAttention(t, packed)
    hidden = t.final_norm(_packed_blocks(t, attention, t.blocks))
    if call_observers:
        tokens = int(packed.tokens.numel())
        t.report(packed_forward_flops(t.shape, tokens, attention.rows, attention.width, 0))
    return _take(torch.cat([hidden, hidden.new_zeros(1, t.width)]), read)


def packed_logits(model: nn.Module, packed: PackedSequences, read: Tensor) -> Tensor | None:
    """(..., V) logits of a ``GPT2LMHeadModel`` at the packed tokens ``read``.

    Only the read positions go through the LM head; see :func:`packed_states`. None where
    the lean maths would not be exact (see :func:`lean_decoder`).
    """
    if not _plain_lm(model):
        return None
    hidden = packed_states(model.transformer, packed, read)
    if hidden is None:
        return None
    if call_observers:
        t = model.transformer
        _report_call(t, 2.0 * t.config.n_embd * t.config.vocab_size * read.numel())
    return hidden @ model.lm_head.weight.t()


def _plain_trunk(trunk: nn.Module) -> bool:
    """A ``GPT2Model`` whose forward the lean maths reproduces exactly (hooks aside: callers
    check them on the module they run in place of)."""
    try:
        from transformers import GPT2Model
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if type(trunk) is not GPT2Model:  # subclasses, peft and FSDP wrappers differ
        return False
    cfg = trunk.config
    if (
        not getattr(cfg, "scale_attn_weights", True)
        or getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        or getattr(cfg, "reorder_and_upcast_attn", False)
        or getattr(cfg, "add_cross_attention", False)
        or cfg.n_embd % cfg.n_head
    ):
        return False
    if trunk.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in trunk.modules()):
        return False
    for block in trunk.h:
        layers = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        if any(type(layer) is not Conv1D for layer in layers):
            return False
    return not any(p.is_meta for p in trunk.parameters())


def lean_decoder(model: nn.Module) -> LeanGPT2 | None:
    """A :class:`LeanGPT2` over ``model``'s weights, or None where it would not be exact."""
    return LeanGPT2(model) if _plain_lm(model) else None


def _plain_lm(model: nn.Module) -> bool:
    """A ``GPT2LMHeadModel`` (not a subclass, peft or FSDP wrapper) with a plain trunk and no
    hook that may change outputs."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if type(model) is not GPT2LMHeadModel:
        return False
    return _plain_trunk(model.transformer) and not _has_hooks(model)


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
