"""The lean forwards (alignkit.models.lean) against each architecture's own ``transformers``
forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from alignkit.models import (
    ScalarHeadModel,
    last_token_index,
    lean,
    pack_rollout,
    position_ids_from_mask,
    response_logprobs,
    response_read,
    sequence_logprobs,
)
from alignkit.models.flops import DecoderShape
from alignkit.models.generation import generate
from alignkit.models.tiny import ARCHITECTURES, TinyArchSpec, build_tiny_causal_lm

CORPUS = ["the quick brown fox jumps over the lazy dog", "a tiny model for every test"] * 20
ARCHS = [*ARCHITECTURES, "qwen3"]


def _qwen3(vocab: int) -> nn.Module:
    """Qwen3 (per-head query and key RMSNorms) is not in the tiny builder; built from a config."""
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    """One tiny model per architecture, weights perturbed so that no norm is the identity."""
    root = tmp_path_factory.mktemp("lean_archs")
    out: dict[str, nn.Module] = {}
    torch.manual_seed(0)
    for arch in ARCHS:
        if arch == "qwen3":
            model = _qwen3(200)
        else:
            spec = TinyArchSpec(arch=arch, hidden=64, layers=2, heads=2, kv_heads=1, chat=False)
            path = build_tiny_causal_lm(root / arch, CORPUS, spec)
            model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[arch] = model.eval()
    return out


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 7) left-padded prompts; rows 1 and 2 equal (a group's shared prompt)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, min(vocab, 150), (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :2] = 0
    ids[2], mask[2] = ids[1], mask[1]
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_every_lean_forward_equals_the_model_forward(models: dict, arch: str) -> None:
    model = models[arch]
    assert lean.supports(model), f"{arch} should take the lean path"
    ids, mask = _batch(model.config.vocab_size)
    runs = [
        generate(
            model,
            ids,
            mask,
            max_new_tokens=6,
            eos_token_id=[-1],
            pad_token_id=0,
            generator=torch.Generator().manual_seed(0),
            lean=use_lean,
        )
        for use_lean in (True, False)
    ]
    out, out_hf = runs
    assert torch.equal(out.response_ids, out_hf.response_ids)  # same seed, same samples
    response_mask = out.response_mask.clone()
    response_mask[3, 4:] = 0  # one shorter response
    seq = torch.cat([ids, out.response_ids], 1)
    seq_mask = torch.cat([mask, response_mask], 1)
    ref = sequence_logprobs(model, seq, seq_mask, ids.shape[1])  # the model's own forward
    # Sampling records the log-probs a plain forward gives, on both decoders.
    full = torch.cat([mask, out.response_mask], 1)
    whole = sequence_logprobs(model, seq, full, ids.shape[1])
    torch.testing.assert_close(out.logprobs, whole, atol=2e-5, rtol=0)
    torch.testing.assert_close(out_hf.logprobs, whole, atol=2e-5, rtol=0)
    # Packed training log-probs equal the padded forward's.
    packed = pack_rollout(ids, mask, out.response_ids, response_mask)
    assert packed is not None
    read = response_read(packed, mask, response_mask)
    assert lean.packed_logits(model, packed, read) is not None
    torch.testing.assert_close(
        response_logprobs(model, ids, mask, out.response_ids, response_mask),
        ref,
        atol=2e-5,
        rtol=0,
    )
    # Scalar heads: last-token, packed last-token and packed per-token states.
    trunk = model.base_model
    hf = trunk(
        input_ids=seq, attention_mask=seq_mask, position_ids=position_ids_from_mask(seq_mask)
    ).last_hidden_state
    last = last_token_index(seq_mask)
    rows = torch.arange(seq.shape[0])
    got = lean.last_token_hidden(trunk, seq, seq_mask, last)
    assert got is not None
    torch.testing.assert_close(got, hf[rows, last], atol=2e-5, rtol=1e-4)
    got_packed = lean.packed_last_hidden(trunk, packed)
    assert got_packed is not None
    torch.testing.assert_close(got_packed, hf[rows, last], atol=2e-5, rtol=1e-4)
    states = lean.packed_states(trunk, packed, read)
    assert states is not None
    prompt_len = ids.shape[1]
    cols = prompt_len - 1 + torch.arange(response_mask.shape[1])
    expected = hf[:, cols] * response_mask[..., None]
    torch.testing.assert_close(states, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma"])
def test_packed_gradients_equal_the_model_gradients(models: dict, arch: str) -> None:
    model = models[arch]
    ids, mask = _batch(model.config.vocab_size)
    out = generate(model, ids, mask, max_new_tokens=5, eos_token_id=[-1], pad_token_id=0)
    grads = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            lp = response_logprobs(model, ids, mask, out.response_ids, out.response_mask)
        else:
            seq = torch.cat([ids, out.response_ids], 1)
            seq_mask = torch.cat([mask, out.response_mask], 1)
            lp = sequence_logprobs(model, seq, seq_mask, ids.shape[1])
        (lp * torch.linspace(0.5, 1.5, lp.shape[1])).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_reward_model_scores_through_the_lean_path_on_a_llama(models: dict) -> None:
    rm = ScalarHeadModel(models["llama"]).eval()
    ids, mask = _batch(rm.config.vocab_size)
    raw = rm(ids, mask)[:, -1]  # left padding: the last column is every row's last token
    torch.testing.assert_close(rm.score(ids, mask), raw, atol=2e-5, rtol=1e-4)


def test_lean_path_steps_aside_where_it_would_not_be_exact(models: dict) -> None:
    llama = models["llama"]
    assert lean.lean_decoder(llama) is not None
    # A subclass may change the forward.
    subclass = type("MyLlama", (type(llama),), {})(llama.config)
    assert lean.lean_decoder(subclass) is None
    # Active dropout in train mode; off again once the rate is 0.
    noisy = AutoModelForCausalLM.from_config(llama.config).train()
    noisy.config.attention_dropout = 0.1
    for layer in noisy.model.layers:
        layer.self_attn.attention_dropout = 0.1
    assert lean.lean_decoder(noisy) is None
    assert lean.lean_decoder(noisy.eval()) is not None
    # A hook that may change outputs; an observe-only hook does not count.
    handle = llama.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert lean.lean_decoder(llama) is None and not lean.supports(llama.model)
    handle.remove()
    handle = llama.register_forward_hook(lean.observe_only(lambda *a: None))
    assert lean.lean_decoder(llama) is not None
    handle.remove()
    # Rotary angles that depend on the sequence length.
    dynamic = AutoModelForCausalLM.from_config(llama.config)
    dynamic.model.rotary_emb.rope_type = "dynamic"
    assert lean.lean_decoder(dynamic) is None
    # Not an nn.Linear (a quantised or adapter layer).
    wrapped = AutoModelForCausalLM.from_config(llama.config)
    wrapped.model.layers[1].mlp.up_proj = nn.Sequential(wrapped.model.layers[1].mlp.up_proj)
    assert lean.lean_decoder(wrapped) is None
    assert lean.lean_decoder(nn.Linear(2, 2)) is None


def test_lora_wrapped_models_run_their_own_forward(models: dict) -> None:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_config(models["qwen2"].config)
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear"))
    assert lean.lean_decoder(wrapped) is None
    assert lean.lean_decoder(wrapped.base_model.model) is None  # its projections are LoRA layers


def test_a_context_past_the_sliding_window_runs_the_model_forward(tmp_path: Path) -> None:
    spec = TinyArchSpec(arch="mistral", hidden=64, layers=2, heads=2, kv_heads=1, chat=False)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path, CORPUS, spec))
    model.config.sliding_window = 9
    model.eval()
    assert lean.lean_decoder(model, context=8) is not None
    assert lean.lean_decoder(model, context=9) is None
    ids, mask = _batch(model.config.vocab_size)  # 7 prompt tokens + 6 new > the window
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[-1], pad_token_id=0)
    seq = torch.cat([ids, out.response_ids], 1)
    full = torch.cat([mask, out.response_mask], 1)
    # The model's own (windowed) forward gives the sampling log-probs.
    torch.testing.assert_close(
        out.logprobs, sequence_logprobs(model, seq, full, ids.shape[1]), atol=2e-5, rtol=0
    )
    packed = pack_rollout(ids, mask, out.response_ids, out.response_mask)
    assert packed is not None
    assert lean.packed_logits(model, packed, response_read(packed, mask, out.response_mask)) is None


def test_decoder_shape_reads_llama_and_neox_configs() -> None:
    # Llama, d=64, 4 query heads of 16, 2 key/value heads, gated MLP of 176, 3 layers:
    # q 64*64 + k,v 2*64*32 + o 64*64 = 12288; MLP 3*64*176 = 33792; x3 layers = 138240.
    llama = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        vocab_size=100,
    )
    shape = DecoderShape.from_config(llama)
    assert (shape.attn_width, shape.kv_width, shape.gated_mlp) == (64, 32, True)
    assert shape.matmul_params == 138240
    # GPT-NeoX, d=32, MLP 128, 2 layers: 4*32*32 + 2*32*128 = 12288 per layer.
    neox = AutoConfig.for_model(
        "gpt_neox",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
    )
    assert DecoderShape.from_config(neox).matmul_params == 24576
