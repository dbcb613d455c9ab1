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
static_cache
    The sampling loop (:func:`alignkit.generation.generate`) grows a ``DynamicCache`` by
    concatenation every token, copying every layer's keys and values (``aten::cat``, 10% of
    a GRPO step's CPU time). :func:`generate_static` is the same loop over a ``StaticCache``
    allocated once for prompt plus new tokens and written in place (``cache_position``); it
    samples exactly the same tokens from the same generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import NewGELUActivation

from alignkit import generation
from alignkit.models import position_ids_from_mask

PATCHES = ("fused_gelu", "static_cache")


def _fused_gelu(self: NewGELUActivation, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


@torch.no_grad()
def generate_static(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    return_logprobs: bool = True,
) -> generation.GenerationOutput:
    """:func:`alignkit.generation.generate` over a preallocated ``StaticCache``.

    Same arguments, outputs and sampling order; step t writes its keys and values at cache
    position ``P + t`` instead of concatenating them to the cache.
    """
    from transformers import StaticCache

    generation._check_sampling_args(max_new_tokens, temperature, top_k, top_p, prompt_mask)
    batch, prompt_len = prompt_ids.shape
    mask = prompt_mask.long()
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + max_new_tokens)
    positions = position_ids_from_mask(mask)
    out = model(
        input_ids=prompt_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        cache_position=torch.arange(prompt_len, device=prompt_ids.device),
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens: list[Tensor] = []
    alive_steps: list[Tensor] = []
    logprobs: list[Tensor] = []
    for step in range(max_new_tokens):
        scaled = out.logits[:, -1, :].float() / temperature
        if greedy:
            token = scaled.argmax(dim=-1)
        else:
            probs = torch.softmax(generation._truncate(scaled, top_k, top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        alive = ~finished
        token = torch.where(alive, token, pad_token_id)
        tokens.append(token)
        alive_steps.append(alive)
        if return_logprobs:
            token_logprob = torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None])
            logprobs.append(torch.where(alive, token_logprob.squeeze(-1), 0.0))
        finished = finished | (alive & (token == eos_token_id))
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        length = prompt_len + step + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=full_mask[:, :length],
            position_ids=next_position,
            past_key_values=cache,
            cache_position=torch.tensor([length - 1], device=prompt_ids.device),
            use_cache=True,
        )
        next_position = next_position + 1
    return generation.GenerationOutput(
        response_ids=torch.stack(tokens, dim=1),
        response_mask=torch.stack(alive_steps, dim=1).long(),
        logprobs=torch.stack(logprobs, dim=1) if return_logprobs else None,
        finished=finished,
    )


@contextlib.contextmanager
def apply_patches(names: Sequence[str]) -> Iterator[None]:
    """Apply the named candidate changes for the duration of the block."""
    unknown = sorted(set(names) - set(PATCHES))
    if unknown:
        raise SystemExit(f"--patch: unknown {unknown}; choose from {list(PATCHES)}")
    import alignkit_plugins.core as core

    original = NewGELUActivation.forward, generation.generate, core.generate
    try:
        if "fused_gelu" in names:
            NewGELUActivation.forward = _fused_gelu  # type: ignore[method-assign]
        if "static_cache" in names:
            # The rollout plugin imported the function by name; both references change.
            generation.generate = core.generate = generate_static
        yield
    finally:
        NewGELUActivation.forward, generation.generate, core.generate = original
