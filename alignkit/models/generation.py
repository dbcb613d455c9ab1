"""Batched sampling with a KV cache.

Shapes: B = batch, P = prompt length, R = response length (at most ``max_new_tokens``),
V = vocabulary size.

A small loop of our own rather than ``model.generate``: it takes a seedable ``torch.Generator``,
records the sampling policy's log-probs as it goes (so rollouts need no second forward pass to
get "old" log-probs), and has little per-token overhead, which dominates on tiny models.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, TopKLogitsWarper, TopPLogitsWarper

from alignkit.models import float32_lm_head, position_ids_from_mask, supports_logits_to_keep
from alignkit.models.lean import lean_decoder

__all__ = [
    "GenerationOutput",
    "decode_responses",
    "generate",
    "pad_prompts",
    "sample_from",
    "tokenize_prompts",
]


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Tokenise prompts into a left-padded batch (see :func:`pad_prompts`).

    Returns:
        ``(ids, mask)``, both (B, P) long tensors, P = longest (truncated) prompt.
    """
    if len(texts) == 0:
        raise ValueError("no prompts given")
    return pad_prompts(tokenizer, tokenizer(list(texts))["input_ids"], max_length)


def pad_prompts(
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[Sequence[int]],
    max_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into a batch.

    Prompts longer than ``max_length`` lose tokens from the *left*: the end of a prompt is what
    the response continues from, so it is the part to keep.

    Returns:
        ``(ids, mask)``, both (B, P) long tensors, P = longest (truncated) prompt.
    """
    if len(encoded) == 0:
        raise ValueError("no prompts given")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rows = [list(ids) for ids in encoded]
    if max_length is not None:
        rows = [ids[-max_length:] for ids in rows]
    if any(len(ids) == 0 for ids in rows):
        # A row with no real token has nothing to attend to; fail here rather than with NaNs.
        raise ValueError("a prompt tokenised to zero tokens")
    batch = tokenizer.pad(
        {"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt"
    )
    return batch["input_ids"].long(), batch["attention_mask"].long()


@dataclass
class GenerationOutput:
    """Sampled responses.

    Attributes:
        response_ids: (B, R) sampled tokens, ``pad_token_id`` after a row's EOS.
        response_mask: (B, R) 1 for real response tokens *including* the EOS itself, 0 after.
        logprobs: (B, R) log-prob of each sampled token under the full ``softmax(logits / τ)``
            (before top-k / top-p truncation), 0 where masked; None if not requested.
        finished: (B,) bool, True where the row emitted EOS.
    """

    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor | None
    finished: Tensor


def _check_sampling_args(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, prompt_mask: Tensor
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if bool((prompt_mask.sum(dim=-1) == 0).any()):
        raise ValueError("every prompt needs at least one unmasked token")


def _truncate(scaled_logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """(B, V) τ-scaled logits with tokens outside top-k / nucleus top-p set to -inf.

    Applied in the same order as ``transformers`` (temperature, then top-k, then top-p; Holtzman
    et al., 2020 for nucleus sampling). The warpers ignore their ``input_ids`` argument.
    """
    if top_k > 0:
        scaled_logits = TopKLogitsWarper(top_k)(None, scaled_logits)
    if top_p < 1.0:
        scaled_logits = TopPLogitsWarper(top_p)(None, scaled_logits)
    return scaled_logits


def sample_from(
    probs: Tensor,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """One token per row of (B, V) ``probs`` by inverting the CDF: (B,) long.

    Draws B uniforms instead of the B x V exponentials of ``torch.multinomial`` (its
    ``exponential_`` was 11% of a decode step at the built-in size). With ``u`` in (0, 1] the
    first index whose cumulative probability reaches ``u`` times the row's total always has
    a positive probability, so top-k / top-p truncated tokens are never drawn. The cumulative
    sum is float64 so tail tokens keep their probability to rounding.

    The uniforms are drawn on ``generator``'s device (a generator can only draw there): a
    CUDA generator with probabilities on its GPU draws in place; a CPU generator with
    probabilities on a GPU draws its B numbers on the host and copies them over, the same
    numbers as a CPU run would draw.

    ``rows=(offset, total)``: these B rows are rows ``offset .. offset + B`` of a global batch
    of ``total`` rows split over ranks. The draw is the global batch's ``total`` numbers, of
    which this call takes its rows' own, so with the same generator state on every rank each
    row gets the number it gets in one process sampling the whole batch.
    """
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    draw_on = probs.device if generator is None else generator.device
    offset, total = (0, probs.shape[0]) if rows is None else rows
    if not 0 <= offset <= total - probs.shape[0]:
        raise ValueError(f"rows={rows} does not hold a batch of {probs.shape[0]} rows")
    u = 1.0 - torch.rand(total, 1, generator=generator, dtype=torch.float64, device=draw_on)
    u = u[offset : offset + probs.shape[0]].to(probs.device)  # (B, 1) in (0, 1]
    token = torch.searchsorted(cdf, u * cdf[:, -1:])
    return token.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _all_finished(finished: Tensor, sharded: bool) -> bool:
    """Whether every row has emitted EOS, on every rank when the model is FSDP-sharded.

    Each forward of a sharded model all-gathers parameters with the other ranks, so all ranks
    must run the same number of decode steps: a rank whose rows are done keeps decoding
    padding until every rank is done (the stop decision is a MIN over ranks).
    """
    done = finished.all()
    if sharded:
        import torch.distributed as dist

        flag = done.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        done = flag.bool()
    return bool(done)


def _is_sharded(model: nn.Module) -> bool:
    """An FSDP2 module in a process group of more than one rank."""
    try:
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(model, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1


Decode = Callable[[Tensor | None], Tensor]


def cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` in current
    ``transformers`` (which deprecates ``past_key_values``), ``past_key_values`` before."""
    # A peft model forwards its keywords to the base model, whose signature decides.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _decoder(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    positions: Tensor,
    max_new_tokens: int,
    lean: bool,
) -> Decode:
    """A function from the last sampled (B,) tokens (None: the prompt) to (B, V) logits."""
    next_position = positions[:, -1:] + 1  # (B, 1): first response token's position
    capacity = prompt_ids.shape[1] + max_new_tokens
    fast = lean_decoder(model, capacity) if lean else None
    if fast is not None:
        fast.start(prompt_ids.shape[0], capacity, prompt_mask)

        def lean_step(token: Tensor | None) -> Tensor:
            nonlocal next_position
            if token is None:
                return fast.prefill(prompt_ids, positions)
            logits = fast.forward(token[:, None], next_position)
            next_position = next_position + 1
            return logits

        return lean_step

    mask = prompt_mask
    past: Any = None
    cache_arg = cache_argument(model)

    def hf_step(token: Tensor | None) -> Tensor:
        nonlocal mask, past, next_position
        if token is None:
            # Prefill: only the last position's logits are needed, so skip the (B, P, V)
            # projection.
            extra = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
            with float32_lm_head(model):  # sampling logits are not rounded to bf16
                out = model(
                    input_ids=prompt_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **extra,
                )
        else:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            with float32_lm_head(model):
                out = model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=next_position,
                    use_cache=True,
                    **{cache_arg: past},
                )
            next_position = next_position + 1
        # Not out.get("cache", out.past_key_values): reading the old name warns.
        past = out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401
        return out.logits[:, -1, :]

    return hf_step


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
    return_logprobs: bool = True,
    lean: bool = True,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens after left-padded prompts.

    Args:
        model: causal LM supporting a KV cache and ``use_cache`` (any ``transformers``
            causal LM). Its train/eval mode is left as is; disable dropout for RL rollouts.
        prompt_ids: (B, P) left-padded prompt ids.
        prompt_mask: (B, P) 1 on real prompt tokens.
        eos_token_id: the id, or ids, that end a row (e.g. EOS and a chat template's
            end-of-turn token); the stop token is kept as the row's last response token.
        greedy: take the arg-max token instead of sampling (log-probs still use τ).
        generator: RNG of the sampling draws (:func:`sample_from`); same seed -> same
            samples. Best on the model's device (:meth:`alignkit.backends.Backend.seed`
            makes it so); a CPU generator also works with a model on a GPU.
        rows: ``(offset, total)`` when these prompts are rows ``offset ..`` of a global batch
            of ``total`` rows split over ranks (:func:`sample_from`): with the same generator
            state on every rank, the samples are those of one process generating the whole
            batch, whatever the number of ranks. Every rank must run the same number of
            steps (an FSDP-sharded model does: the loop stops when all ranks are done).
        lean: decode a supported model (GPT-2, the Llama family, GPT-NeoX) with
            :mod:`alignkit.models.lean` (same maths, a preallocated cache, no per-token mask or
            rotary rebuild); other models, and ``False``, use the model's own forward.

    Returns:
        :class:`GenerationOutput` with R <= ``max_new_tokens`` columns: the loop stops as soon as
        every row has emitted EOS (on every rank, for an FSDP-sharded ``model``: all ranks
        must take part in every forward).

    Log-prob convention: ``logprobs`` are taken from the full temperature-scaled distribution,
    *not* the top-k / top-p truncated one we sample from. This is what
    :func:`alignkit.models.sequence_logprobs` recomputes during training, so importance ratios
    between the rollout and the training policy are exactly 1 before any update (in float32;
    under bf16 autocast the LM head still runs in float32 on both sides, and what is left is
    the bf16 body's rounding, which differs between an incremental decode and a full forward).
    """
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p, prompt_mask)
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    mask = prompt_mask.long()
    positions = position_ids_from_mask(mask)
    sharded = _is_sharded(model)  # checked once, not per token
    decode = _decoder(model, prompt_ids, mask, positions, max_new_tokens, lean)
    stops = torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device
    )
    logits = decode(None)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    alive_steps: list[Tensor] = []
    logprobs: list[Tensor] = []

    for step in range(max_new_tokens):
        scaled = logits.float() / temperature  # (B, V)
        if greedy:
            token = scaled.argmax(dim=-1)
        else:
            probs = torch.softmax(_truncate(scaled, top_k, top_p), dim=-1)
            token = sample_from(probs, generator, rows)
        alive = ~finished
        token = torch.where(alive, token, pad_token_id)  # finished rows only emit padding
        tokens.append(token)
        alive_steps.append(alive)
        if return_logprobs:
            token_logprob = torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None])
            logprobs.append(torch.where(alive, token_logprob.squeeze(-1), 0.0))
        finished = finished | (alive & torch.isin(token, stops))
        # One host sync per token; it lets a batch that is done stop paying for more forwards.
        if step == max_new_tokens - 1 or _all_finished(finished, sharded):
            break
        # Finished rows keep running on padding; their outputs are discarded by the mask.
        logits = decode(token)

    return GenerationOutput(
        response_ids=torch.stack(tokens, dim=1),
        response_mask=torch.stack(alive_steps, dim=1).long(),
        logprobs=torch.stack(logprobs, dim=1) if return_logprobs else None,
        finished=finished,
    )


def decode_responses(
    tokenizer: PreTrainedTokenizerBase,
    response_ids: Tensor,
    response_mask: Tensor,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """(B, R) ids and mask -> B strings, without the stop token / padding and one leading space
    removed.

    ``stop_ids`` (default: the tokenizer's EOS) are the tokens a row may end with. The leading
    space comes from byte-level BPE, where a word after the prompt is encoded with its
    separating space (" world").
    """
    texts = []
    stops = {tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist(), strict=True):
        kept = [tok for tok, keep in zip(ids, mask, strict=True) if keep]
        if kept and kept[-1] in stops:
            kept = kept[:-1]
        text = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts.append(text.removeprefix(" "))
    return texts
