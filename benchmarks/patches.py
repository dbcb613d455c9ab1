"""Candidate speed changes to code outside the benchmarks, applied only inside a measurement.

``python -m benchmarks --patch fused_gelu`` runs each alignkit workload twice per round,
as it is and with the patch, alternating with TRL, so the table shows what the change would
buy before it is made in the library:

fused_gelu
    GPT-2 configs name ``gelu_new``, which ``transformers`` computes as a chain of
    element-wise ops, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``: 7 kernels over the
    (tokens x 4d) activation forward and more backward, 17% of a GRPO step's CPU time in
    the profile. The patch computes the same formula with one fused kernel
    (``F.gelu(x, approximate="tanh")``, what the ``gelu_pytorch_tanh`` config value selects);
    logits agree to about 1e-6. In the library the change is
    ``GPT2Config(activation_function="gelu_pytorch_tanh")`` in ``build_tiny_model`` (and
    the same swap when ``load_causal_lm`` loads a ``gelu_new`` model).
hf_decode
    Decodes through the model's own forward (``transformers``' GPT-2 with its
    ``DynamicCache``, grown by concatenation every token, and a mask rebuilt every call)
    instead of :mod:`alignkit.models.lean`'s lean GPT-2 path: how alignkit sampled before
    the lean path was adopted, so the row shows what it buys. Same tokens from the same
    generator.
padded
    Runs the update, reference, critic and reward-model forwards padded (each row's prompt
    and response padded to the micro-batch's longest, rows sorted by length, all-padding
    columns trimmed) instead of packed (:mod:`alignkit.models.packing`: each distinct token once,
    a prompt shared by its samples): how alignkit ran them before packing was adopted, so
    the row shows what packing buys. Same values to float rounding.
index_gather
    Gathers the packed layout with advanced indexing (``x[index]``) instead of
    ``index_select`` (``alignkit.models.lean._take``): how the packed forwards gathered before.
    Same values; the backward accumulates with ``index_put_``, which the CPU runs serially.
prefill_rows
    Prefills every sampling row (:meth:`alignkit.models.lean.LeanDecoder.forward`) instead of each
    distinct prompt once (:meth:`~alignkit.models.lean.LeanDecoder.prefill`): the group's 4 copies
    of a prompt computed 4 times, as before. Same tokens from the same generator.
critic_forwards
    PPO's critic takes its no-grad rollout forward and a second forward in the update, as
    before ``algorithm.value_forward_once`` (``ppo._critic_steps_once`` answers no): the
    same step to float rounding, one critic forward more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from transformers.activations import NewGELUActivation

from alignkit.models import generation, lean

PATCHES = ("fused_gelu", "hf_decode", "padded", "index_gather", "prefill_rows", "critic_forwards")
_GENERATE = generation.generate


def _no_pack(*_: Any, **__: Any) -> None:
    return None


def _fused_gelu(self: NewGELUActivation, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _index_gather(x: Tensor, index: Tensor) -> Tensor:
    return x[index]


def _prefill_rows(self: lean.LeanDecoder, ids: Tensor, positions: Tensor) -> Tensor:
    return self.forward(ids, positions)


def generate_hf(*args: Any, **kwargs: Any) -> Any:
    """:func:`alignkit.models.generation.generate` through the model's own forward."""
    return _GENERATE(*args, **{**kwargs, "lean": False})


@contextlib.contextmanager
def apply_patches(names: Sequence[str]) -> Iterator[None]:
    """Apply the named candidate changes for the duration of the block."""
    unknown = sorted(set(names) - set(PATCHES))
    if unknown:
        raise SystemExit(f"--patch: unknown {unknown}; choose from {list(PATCHES)}")
    import alignkit_plugins.ppo as ppo

    from alignkit.models import hf as models
    from alignkit.rl import critic
    from alignkit.rl import update as training
    from alignkit.rollout import engines

    original = NewGELUActivation.forward, generation.generate, engines.generate, lean._take
    prefill, critic_once = lean.LeanDecoder.prefill, ppo._critic_steps_once
    packing = (
        models.pack_rollout,
        critic.pack_rollout,
        training.packs,
        models.ScalarHeadModel.score_packed,
    )
    try:
        if "fused_gelu" in names:
            NewGELUActivation.forward = _fused_gelu  # type: ignore[method-assign]
        if "hf_decode" in names:
            # The native engine imported the function by name; both references change.
            generation.generate = engines.generate = generate_hf
        if "padded" in names:
            models.pack_rollout = critic.pack_rollout = _no_pack
            training.packs = lambda _model: False
            models.ScalarHeadModel.score_packed = _no_pack  # type: ignore[method-assign]
        if "index_gather" in names:
            lean._take = _index_gather
        if "prefill_rows" in names:
            lean.LeanDecoder.prefill = _prefill_rows  # type: ignore[method-assign]
        if "critic_forwards" in names:
            ppo._critic_steps_once = lambda *_: False
        yield
    finally:
        NewGELUActivation.forward, generation.generate, engines.generate, lean._take = original
        lean.LeanDecoder.prefill, ppo._critic_steps_once = prefill, critic_once
        (
            models.pack_rollout,
            critic.pack_rollout,
            training.packs,
            models.ScalarHeadModel.score_packed,
        ) = packing
