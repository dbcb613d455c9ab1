"""Batched KV-cache sampling against unbatched and cache-free references."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from alignkit.models import (
    TinyModelSpec,
    build_tiny_model,
    load_causal_lm,
    position_ids_from_mask,
    sequence_logprobs,
)
from alignkit.models.generation import (
    GenerationOutput,
    decode_responses,
    generate,
    sample_from,
    tokenize_prompts,
)
from alignkit.models.lean import lean_decoder, observe_only

SPEC = TinyModelSpec(vocab_size=300, n_layer=2, n_head=2, n_embd=64, n_positions=64, seed=0)
CORPUS = [
    " ".join(parts)
    for parts in itertools.product(
        ["the cat", "a dog", "my friend", "a small bird"],
        ["sat on", "ran to", "looked at"],
        ["the mat.", "a tree!", "the red house?"],
    )
]
PROMPTS = ["the cat", "a small bird looked at the", "my"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine the thread
    hand-offs dominate each forward; one thread keeps these tests fast and their timing stable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gen") / "model", CORPUS, SPEC)


@pytest.fixture(scope="module")
def lm(model_dir: Path):
    return load_causal_lm(str(model_dir))


@pytest.fixture
def fresh_lm(model_dir: Path):
    """A private copy for tests that attach hooks."""
    return load_causal_lm(str(model_dir))


def _ids(tokenizer) -> dict[str, int]:
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _bias_hook(model: nn.Module, bias_fn) -> torch.utils.hooks.RemovableHandle:
    """Add ``bias_fn(call_index, logits)`` to the LM-head output; counts forward calls."""
    calls = itertools.count()

    def hook(module, inputs, output):
        return output + bias_fn(next(calls), output)

    return model.get_output_embeddings().register_forward_hook(hook)


def _token_bias(vocab: int, token: int, value: float) -> torch.Tensor:
    bias = torch.zeros(vocab)
    bias[token] = value
    return bias


def _real(out: GenerationOutput, row: int) -> list[int]:
    return out.response_ids[row][out.response_mask[row].bool()].tolist()


# ------------------------------------------------------------------------------ prompts


def test_tokenize_prompts_left_pads_and_left_truncates(lm) -> None:
    _, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    assert ids.shape == mask.shape == (3, max(map(len, encoded)))
    for row, enc in enumerate(encoded):
        assert ids[row, ids.shape[1] - len(enc) :].tolist() == enc
        assert mask[row].tolist() == [0] * (ids.shape[1] - len(enc)) + [1] * len(enc)
        assert set(ids[row, : ids.shape[1] - len(enc)].tolist()) <= {tokenizer.pad_token_id}
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, max_length=3)
    assert ids.shape[1] == 3
    assert ids[1].tolist() == encoded[1][-3:]  # the end of the prompt is kept
    with pytest.raises(ValueError):
        tokenize_prompts(tokenizer, [])


# ------------------------------------------------------------------------------ greedy


def test_batched_left_padded_greedy_equals_each_prompt_alone(lm) -> None:
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    batched = generate(model, ids, mask, max_new_tokens=10, greedy=True, **_ids(tokenizer))
    for row, prompt in enumerate(PROMPTS):
        one_ids, one_mask = tokenize_prompts(tokenizer, [prompt])
        alone = generate(
            model, one_ids, one_mask, max_new_tokens=10, greedy=True, **_ids(tokenizer)
        )
        assert _real(batched, row) == _real(alone, 0)
        n = len(_real(alone, 0))
        torch.testing.assert_close(
            batched.logprobs[row, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0
        )


def test_kv_cache_greedy_equals_naive_full_recompute(lm) -> None:
    model, tokenizer = lm
    prompt = tokenizer.encode(PROMPTS[1])
    out = generate(
        model,
        torch.tensor([prompt]),
        torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12,
        greedy=True,
        **_ids(tokenizer),
    )
    seq, naive = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            next_token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            naive.append(next_token)
            seq.append(next_token)
            if next_token == tokenizer.eos_token_id:
                break
    assert out.response_ids[0].tolist() == naive


def test_top_k_1_and_tiny_top_p_reduce_to_greedy(lm) -> None:
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    greedy = generate(model, ids, mask, max_new_tokens=6, greedy=True, **_ids(tokenizer))
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        gen = torch.Generator().manual_seed(0)
        sampled = generate(
            model, ids, mask, max_new_tokens=6, generator=gen, **kwargs, **_ids(tokenizer)
        )
        assert torch.equal(sampled.response_ids, greedy.response_ids)


# ------------------------------------------------------------------------------ sampling


def _sample(model, tokenizer, seed: int, **kwargs) -> GenerationOutput:
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    gen = torch.Generator().manual_seed(seed)
    return generate(model, ids, mask, max_new_tokens=8, generator=gen, **kwargs, **_ids(tokenizer))


def test_same_seed_same_samples_different_seed_different(lm) -> None:
    model, tokenizer = lm
    a, b, c = (_sample(model, tokenizer, seed) for seed in (7, 7, 8))
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_top_k_samples_only_top_k_tokens(lm) -> None:
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    out = _sample(model, tokenizer, 0, top_k=3)
    full_ids = torch.cat([ids, out.response_ids], dim=1)
    full_mask = torch.cat([mask, out.response_mask], dim=1)
    with torch.no_grad():
        logits = model(
            full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)
        ).logits[:, ids.shape[1] - 1 : -1]
    top3 = logits.topk(3, dim=-1).indices
    in_top = (top3 == out.response_ids[..., None]).any(-1)
    assert torch.all(in_top[out.response_mask.bool()])


@pytest.fixture
def eos_prone(fresh_lm) -> Iterator[tuple[nn.Module, object]]:
    """The model with a constant bias toward EOS, so sampled lengths vary (stateless hook)."""
    model, tokenizer = fresh_lm
    bias = _token_bias(len(tokenizer), tokenizer.eos_token_id, 3.0)
    handle = _bias_hook(model, lambda _, logits: bias)
    yield model, tokenizer
    handle.remove()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 0.9)]
)
def test_logprobs_match_recomputation(eos_prone, temperature, top_k, top_p) -> None:
    model, tokenizer = eos_prone
    ids, mask = tokenize_prompts(tokenizer, PROMPTS * 2)
    gen = torch.Generator().manual_seed(1)
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=10,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=gen,
        **_ids(tokenizer),
    )
    # The bias makes some rows stop early and others not, so padding is exercised.
    assert out.finished.any() and out.response_mask.eq(0).any()
    with torch.no_grad():
        recomputed = sequence_logprobs(
            model,
            torch.cat([ids, out.response_ids], dim=1),
            torch.cat([mask, out.response_mask], dim=1),
            response_start=ids.shape[1],
            temperature=temperature,
        )
    torch.testing.assert_close(out.logprobs, recomputed, atol=1e-4, rtol=0)
    assert torch.all(out.logprobs[out.response_mask == 0] == 0)


# ------------------------------------------------------------------------------ stopping


def test_eos_then_padding_and_finished_flags(fresh_lm) -> None:
    model, tokenizer = fresh_lm
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def bias(call: int, logits: torch.Tensor) -> torch.Tensor:
        # Call 0 is the prefill, so call k yields response token k. Row 0 is forced to EOS at
        # token 3; row 1 can never emit EOS.
        out = torch.zeros_like(logits)
        out[1, :, eos] = -1e9
        if call == 3:
            out[0, :, eos] = 1e9
        return out

    handle = _bias_hook(model, bias)
    try:
        ids, mask = tokenize_prompts(tokenizer, PROMPTS[:2])
        gen = torch.Generator().manual_seed(0)
        out = generate(
            model, ids, mask, max_new_tokens=7, generator=gen, eos_token_id=eos, pad_token_id=pad
        )
    finally:
        handle.remove()
    assert out.response_ids.shape == out.response_mask.shape == out.logprobs.shape == (2, 7)
    assert out.finished.tolist() == [True, False]
    assert out.response_ids[0, 3].item() == eos
    assert out.response_ids[0, 4:].tolist() == [pad] * 3
    assert out.response_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # EOS itself is kept
    assert out.response_mask[1].tolist() == [1] * 7
    assert eos not in out.response_ids[1].tolist()
    assert torch.all(out.logprobs[0, 4:] == 0) and torch.all(out.logprobs[:, :3] < 0)
    assert out.logprobs[0, 3].item() > -1e-3  # EOS was (almost) certain


def test_stops_early_when_every_row_finished(fresh_lm) -> None:
    model, tokenizer = fresh_lm
    bias = _token_bias(len(tokenizer), tokenizer.eos_token_id, 1e9)
    handle = _bias_hook(model, lambda call, _: bias if call >= 1 else 0.0)
    try:
        ids, mask = tokenize_prompts(tokenizer, PROMPTS)
        out = generate(model, ids, mask, max_new_tokens=20, greedy=True, **_ids(tokenizer))
    finally:
        handle.remove()
    assert out.response_ids.shape == (3, 2)
    assert out.response_ids[:, 1].tolist() == [tokenizer.eos_token_id] * 3
    assert out.finished.all() and out.response_mask.all()


def test_max_new_tokens_respected(fresh_lm) -> None:
    model, tokenizer = fresh_lm
    bias = _token_bias(len(tokenizer), tokenizer.eos_token_id, -1e9)
    handle = _bias_hook(model, lambda *_: bias)
    try:
        out = _sample(model, tokenizer, 0)
        no_lp = _sample(model, tokenizer, 0, return_logprobs=False)
    finally:
        handle.remove()
    assert out.response_ids.shape == (3, 8)
    assert out.response_mask.all() and not out.finished.any()
    assert no_lp.logprobs is None and torch.equal(no_lp.response_ids, out.response_ids)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 0}, {"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}],
)
def test_invalid_arguments(lm, kwargs) -> None:
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    with pytest.raises(ValueError):
        generate(model, ids, mask, **{"max_new_tokens": 4, **kwargs}, **_ids(tokenizer))


# ------------------------------------------------------------------------------ decoding


def test_decode_responses(lm) -> None:
    _, tokenizer = lm
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    first = [*tokenizer.encode(" sat on the mat."), eos]
    second = tokenizer.encode(" ran  to\na tree!")
    width = max(len(first), len(second)) + 1
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in (first, second)])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in (first, second)])
    assert decode_responses(tokenizer, ids, mask) == ["sat on the mat.", "ran  to\na tree!"]


# ------------------------------------------------------------------------------ lean decoder


@pytest.mark.parametrize(
    ("greedy", "temperature", "top_k", "top_p"),
    [(True, 1.0, 0, 1.0), (False, 1.0, 0, 1.0), (False, 0.7, 20, 0.9)],
)
def test_lean_decoder_samples_what_the_model_forward_samples(
    lm, greedy, temperature, top_k, top_p
) -> None:
    model, tokenizer = lm
    assert lean_decoder(model) is not None  # the tiny GPT-2 takes the lean path
    ids, mask = tokenize_prompts(tokenizer, PROMPTS * 3)  # left padding of 0 to 6 tokens
    outs = [
        generate(
            model,
            ids,
            mask,
            max_new_tokens=12,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=torch.Generator().manual_seed(3),
            lean=lean,
            **_ids(tokenizer),
        )
        for lean in (True, False)
    ]
    assert torch.equal(outs[0].response_ids, outs[1].response_ids)
    assert torch.equal(outs[0].response_mask, outs[1].response_mask)
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=0)


def test_lean_prefill_logits_equal_the_model_on_real_positions(lm) -> None:
    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    fast = lean_decoder(model)
    assert fast is not None
    fast.start(ids.shape[0], ids.shape[1] + 4, mask)
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        lean = fast.forward(ids, positions, last_only=False)  # (B, P, V)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.isfinite(lean).all()  # left-padding queries attend to themselves, no NaN
    torch.testing.assert_close(lean[real], ref[real], atol=1e-5, rtol=1e-5)
    assert fast.length == ids.shape[1]


def test_lean_prefill_computes_each_distinct_prompt_once(lm) -> None:
    """A group's repeated prompts: the same logits and cache as every row computed, from the
    forward of the 3 distinct rows only (the FLOP observer sees 3 rows, not 7)."""
    from alignkit.models import lean

    model, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, [*PROMPTS, PROMPTS[1], *PROMPTS[::-1]][:7])
    positions = position_ids_from_mask(mask)
    fast, full = lean_decoder(model), lean_decoder(model)
    assert fast is not None and full is not None
    calls: list[float] = []
    lean.call_observers.append(lambda _trunk, flops: calls.append(flops))
    try:
        with torch.no_grad():
            for decoder in (fast, full):
                decoder.start(ids.shape[0], ids.shape[1] + 2, mask)
            once = fast.prefill(ids, positions)  # (7, V)
            every = full.forward(ids, positions)
    finally:
        lean.call_observers.pop()
    torch.testing.assert_close(once, every, atol=1e-6, rtol=1e-6)
    end = ids.shape[1]
    for a, b in zip(fast.k_cache + fast.v_cache, full.k_cache + full.v_cache, strict=True):
        real = mask.bool()[:, None, :, None].expand_as(a[:, :, :end])
        torch.testing.assert_close(a[:, :, :end][real], b[:, :, :end][real], atol=1e-6, rtol=0)
    assert fast.length == full.length == end
    assert calls[0] * 7 == pytest.approx(calls[1] * 3)  # 3 distinct rows of 7


def test_lean_decoder_steps_aside_where_it_would_not_be_exact(model_dir: Path) -> None:
    model, _ = load_causal_lm(str(model_dir))
    assert lean_decoder(model) is not None
    # A forward hook may change outputs (a logit bias): the model's own forward must run.
    handle = model.lm_head.register_forward_hook(lambda *_: None)
    assert lean_decoder(model) is None
    handle.remove()
    # An observe-only hook does not.
    handle = model.lm_head.register_forward_hook(observe_only(lambda *_: None))
    assert lean_decoder(model) is not None
    handle.remove()
    # Active dropout in train mode.
    noisy, _ = load_causal_lm(str(model_dir))
    noisy.transformer.drop.p = 0.1
    noisy.train()
    assert lean_decoder(noisy) is None
    noisy.eval()
    assert lean_decoder(noisy) is not None
    # Attention variants the lean forward does not implement.
    variant, _ = load_causal_lm(str(model_dir))
    variant.config.scale_attn_by_inverse_layer_idx = True
    assert lean_decoder(variant) is None
    # Another architecture, and a subclass that may override the forward.
    assert lean_decoder(nn.Linear(2, 2)) is None
    subclass = type("MyGPT2", (type(model),), {})
    assert lean_decoder(subclass(model.config)) is None


def test_lean_decoder_is_skipped_for_lora_adapters(model_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    model, tokenizer = load_causal_lm(str(model_dir))
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(model, config)
    assert lean_decoder(wrapped) is None
    assert lean_decoder(wrapped.base_model.model) is None  # its c_attn is a LoRA layer now
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    out = generate(wrapped, ids, mask, max_new_tokens=3, greedy=True, **_ids(tokenizer))
    assert out.response_ids.shape[0] == len(PROMPTS)


# ------------------------------------------------------------------------------ sampler


def test_sample_from_inverts_the_cdf() -> None:
    """Hand-computed buckets: u' = 1 - U in (0, 0.1] -> 0, (0.1, 0.3] -> 1, (0.3, 1] -> 2."""
    probs = torch.tensor([[0.1, 0.2, 0.7]]).repeat(64, 1)
    tokens = sample_from(probs, torch.Generator().manual_seed(5))
    u = 1.0 - torch.rand(64, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = (u > 0.1).long().squeeze(-1) + (u > 0.3).long().squeeze(-1)
    assert torch.equal(tokens, expected)


def test_sample_from_never_draws_zero_probability_tokens_and_matches_frequencies() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from(probs, gen) for _ in range(4000)])  # (4000, 2)
    assert set(draws[:, 0].tolist()) <= {1, 3}
    assert draws[:, 1].eq(0).all()
    # Binomial(4000, 0.25): std 27, so +-4 std is +-110 draws.
    assert abs(int(draws[:, 0].eq(1).sum()) - 1000) < 110
