"""Tiny-model building, loading, the scalar head and sequence log-probs."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from alignkit import models
from alignkit.models import (
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    SPECIAL_TOKENS,
    ModelLoadError,
    ScalarHeadModel,
    TinyModelSpec,
    build_tiny_model,
    count_parameters,
    disable_dropout,
    is_scalar_head_folder,
    last_token_index,
    load_causal_lm,
    position_ids_from_mask,
    sequence_logprobs,
)
from alignkit.models.lean import last_token_hidden

SPEC = TinyModelSpec(vocab_size=300, n_layer=2, n_head=2, n_embd=64, n_positions=64, seed=3)
SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird"]
VERBS = ["sat on", "ran to", "looked at", "walked past"]
OBJECTS = ["the mat.", "a tree!", "the park.", "the red house?"]
CORPUS = [" ".join(parts) for parts in itertools.product(SUBJECTS, VERBS, OBJECTS)]


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
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", CORPUS, SPEC)


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> tuple[nn.Module, object]:
    return load_causal_lm(str(model_dir))


def _batch(tokenizer, prompts: list[str], responses: list[str]):
    """[left-padded prompt | right-padded response] batch plus the unpadded pieces."""
    p_ids = [tokenizer.encode(p) for p in prompts]
    r_ids = [tokenizer.encode(r) for r in responses]
    width_p, width_r = max(map(len, p_ids)), max(map(len, r_ids))
    pad = tokenizer.pad_token_id
    ids, mask = [], []
    for p, r in zip(p_ids, r_ids, strict=True):
        ids.append([pad] * (width_p - len(p)) + p + r + [pad] * (width_r - len(r)))
        mask.append([0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r)))
    return torch.tensor(ids), torch.tensor(mask), width_p, p_ids, r_ids


# ------------------------------------------------------------------------------ building


def test_reload_with_auto_classes_gives_seeded_weights(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(SPEC.seed)
    reference = GPT2LMHeadModel(config).eval()
    ids = torch.tensor([tokenizer.encode("the cat looked at a tree!")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert (model_dir / "model.safetensors").is_file()
    assert config.n_layer == SPEC.n_layer and config.n_embd == SPEC.n_embd
    assert config.vocab_size == len(tokenizer) <= SPEC.vocab_size


def test_build_is_deterministic_in_seed(tmp_path: Path) -> None:
    a = load_file(build_tiny_model(tmp_path / "a", CORPUS, SPEC) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", CORPUS, SPEC) / "model.safetensors")
    other = TinyModelSpec(**{**SPEC.__dict__, "seed": SPEC.seed + 1})
    c = load_file(build_tiny_model(tmp_path / "c", CORPUS, other) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["transformer.h.0.attn.c_attn.weight"], c["transformer.h.0.attn.c_attn.weight"]
    )


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", CORPUS, SPEC)
    torch.testing.assert_close(torch.rand(3), expected)


def test_build_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = build_tiny_model(tmp_path / "m", CORPUS, SPEC)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(tmp_path / "m", CORPUS, SPEC)
    # The previous complete model is untouched and no scratch folder is left behind.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_rebuild_replaces_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_tiny_model(out, CORPUS, SPEC)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tokenizer_round_trip_and_special_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text in ["the cat sat on the mat.", "  two  spaces , tab\there\nnewline", "ünïcødé 😀 ."]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.pad_token == SPECIAL_TOKENS["pad_token"]
    assert tokenizer.eos_token == SPECIAL_TOKENS["eos_token"]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == SPEC.n_positions
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.pad_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_train_tokenizer_rejects_vocab_below_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        models.train_tokenizer(CORPUS, 100)


# ------------------------------------------------------------------------------ loading


def test_load_causal_lm(lm) -> None:
    model, tokenizer = lm
    assert not model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["./does-not-exist", "/no/such/dir", "a/b/c", "~/no-such-model-x"])
def test_missing_local_path_raises(name: str) -> None:
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_causal_lm(name)


def test_missing_path_object_raises(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ModelLoadError, match=str(missing)) as info:
        load_causal_lm(missing)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModelLoadError, match=str(missing)):
        ScalarHeadModel.from_pretrained(missing)


def test_hub_errors_are_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="couldn't connect") as info:
        load_causal_lm("some-org/some-model")
    assert isinstance(info.value.__cause__, OSError)


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type, calls: list[dict]) -> None:
    original = cls.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", spy)


def test_trust_remote_code_defaults_to_false(monkeypatch: pytest.MonkeyPatch, model_dir: Path):
    calls: list[dict] = []
    _spy(monkeypatch, AutoModelForCausalLM, calls)
    _spy(monkeypatch, AutoTokenizer, calls)
    _spy(monkeypatch, models.AutoModel, calls)
    load_causal_lm(str(model_dir))
    ScalarHeadModel.from_pretrained(model_dir)
    assert len(calls) == 3
    assert all(call["trust_remote_code"] is False for call in calls)
    calls.clear()
    load_causal_lm(str(model_dir), trust_remote_code=True, revision="main")
    assert all(call["trust_remote_code"] is True for call in calls)
    assert all(call["revision"] == "main" for call in calls)


def test_pad_equal_to_eos_is_replaced(tmp_path: Path, model_dir: Path) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    tokenizer = AutoTokenizer.from_pretrained(copy)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(copy)
    model, loaded = load_causal_lm(str(copy))
    assert loaded.pad_token == SPECIAL_TOKENS["pad_token"]
    assert loaded.padding_side == "left"
    assert model.config.pad_token_id == loaded.pad_token_id != loaded.eos_token_id
    assert model.get_input_embeddings().num_embeddings >= len(loaded)


def test_unknown_dtype_rejected(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(str(model_dir), dtype="float8")


def test_disable_dropout(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        # Control: the built model does have active dropout.
        assert not torch.equal(model(ids).logits, model(ids).logits)
        disable_dropout(model)
        assert model.training
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0


def test_loaded_model_is_deterministic_in_train_mode(lm) -> None:
    model, _ = lm
    ids = torch.arange(3, 20)[None]
    try:
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    finally:
        model.eval()


def test_count_parameters_counts_tied_weights_once() -> None:
    shared = nn.Linear(3, 2)  # 3 * 2 + 2 = 8
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 8
    assert count_parameters(nn.Sequential(shared, nn.Linear(2, 1))) == 8 + 3


# ------------------------------------------------------------------------------ helpers


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 1]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_last_token_index() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [3, 1, 0, 3]


# ------------------------------------------------------------------------------ log-probs


PROMPTS = ["the cat", "a small bird looked at", "my"]
RESPONSES = [" sat on the mat.", " the park.", " friend ran to the red house?"]


def _manual_logprobs(model, p_ids, r_ids, temperature):
    """Per-sequence log-probs and entropies computed without any padding."""
    lps, ents = [], []
    for p, r in zip(p_ids, r_ids, strict=True):
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1]
        logp = torch.log_softmax(logits / temperature, dim=-1)
        lps.append(logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
        ents.append(-(logp.exp() * logp).sum(-1))
    return lps, ents


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_match_unpadded(lm, temperature: float) -> None:
    model, tokenizer = lm
    ids, mask, width_p, p_ids, r_ids = _batch(tokenizer, PROMPTS, RESPONSES)
    assert len({len(p) for p in p_ids}) > 1 and len({len(r) for r in r_ids}) > 1
    with torch.no_grad():
        got, entropy = sequence_logprobs(
            model, ids, mask, width_p, temperature=temperature, return_entropy=True
        )
        expected, expected_entropy = _manual_logprobs(model, p_ids, r_ids, temperature)
    assert got.shape == entropy.shape == (len(PROMPTS), ids.shape[1] - width_p)
    for i, (lp, ent) in enumerate(zip(expected, expected_entropy, strict=True)):
        n = len(lp)
        torch.testing.assert_close(got[i, :n], lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :n], ent, atol=1e-5, rtol=0)
        assert torch.all(got[i, n:] == 0) and torch.all(entropy[i, n:] == 0)


def test_sequence_logprobs_temperature_changes_result(lm) -> None:
    model, tokenizer = lm
    ids, mask, width_p, _, _ = _batch(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        cold = sequence_logprobs(model, ids, mask, width_p, temperature=0.5)
        warm = sequence_logprobs(model, ids, mask, width_p)
    assert not torch.allclose(cold[mask[:, width_p:].bool()], warm[mask[:, width_p:].bool()])


def test_sequence_logprobs_without_logits_to_keep(lm) -> None:
    model, tokenizer = lm

    class Plain(nn.Module):  # a forward without ``logits_to_keep``: full logits are sliced
        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            )

    ids, mask, width_p, _, _ = _batch(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logprobs(Plain(), ids, mask, width_p),
            sequence_logprobs(model, ids, mask, width_p),
        )


def test_sequence_logprobs_has_gradients(lm) -> None:
    model, tokenizer = lm
    ids, mask, width_p, _, _ = _batch(tokenizer, PROMPTS, RESPONSES)
    sequence_logprobs(model, ids, mask, width_p).sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ scalar head


def _scores_alone(value: ScalarHeadModel, seqs: list[list[int]]) -> torch.Tensor:
    return torch.cat(
        [value.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
    )


def test_scalar_head_from_causal_lm_folder(model_dir: Path) -> None:
    torch.manual_seed(0)
    value = ScalarHeadModel.from_pretrained(model_dir)
    torch.manual_seed(0)
    again = ScalarHeadModel.from_pretrained(model_dir)
    lm_model = AutoModelForCausalLM.from_pretrained(model_dir)
    # The backbone carries the LM's transformer weights; the head is a fresh deterministic init.
    torch.testing.assert_close(
        value.backbone.get_input_embeddings().weight, lm_model.get_input_embeddings().weight
    )
    assert torch.equal(value.head.weight, again.head.weight)
    assert torch.all(value.head.bias == 0)
    hidden = SPEC.n_embd
    assert 0.5 / (hidden + 1) ** 0.5 < value.head.weight.std() < 2.0 / (hidden + 1) ** 0.5
    assert not value.training
    assert (value.mean.item(), value.std.item()) == (0.0, 1.0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_reads_last_real_token(model_dir: Path, side: str) -> None:
    torch.manual_seed(0)
    value = ScalarHeadModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = ["the cat sat on the mat.", "a dog", "my friend walked past the red house?"]
    seqs = [tokenizer.encode(t) for t in texts]
    batch = tokenizer.pad({"input_ids": seqs}, padding_side=side, return_tensors="pt")
    with torch.no_grad():
        got = value.score(batch["input_ids"], batch["attention_mask"])
        expected = _scores_alone(value, seqs)
        per_token = value(batch["input_ids"], batch["attention_mask"])
    assert got.shape == (len(texts),) and per_token.shape == batch["input_ids"].shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Scores of different lengths differ, so reading a wrong position would be caught.
    assert len(set(expected.tolist())) == len(texts)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lean_score_equals_the_full_forward_with_gradients(model_dir: Path, side: str) -> None:
    """The last-token forward (alignkit.models.lean) against the backbone's own forward."""
    torch.manual_seed(0)
    value = ScalarHeadModel.from_pretrained(model_dir)
    value.train()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = ["the cat sat on the mat.", "a dog", "my friend walked past the red house?"]
    batch = tokenizer.pad(
        {"input_ids": [tokenizer.encode(t) for t in texts]}, padding_side=side, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    index = last_token_index(mask)
    assert last_token_hidden(value.backbone, ids, mask, index) is not None
    lean = value.score(ids, mask)
    lean.pow(2).sum().backward()
    lean_grads = {n: p.grad.clone() for n, p in value.named_parameters() if p.grad is not None}
    value.zero_grad(set_to_none=True)
    full = value(ids, mask).gather(1, index[:, None]).squeeze(1)
    full.pow(2).sum().backward()
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)
    assert lean_grads.keys() == {n for n, p in value.named_parameters() if p.grad is not None}
    for name, param in value.named_parameters():
        torch.testing.assert_close(lean_grads[name], param.grad, atol=1e-5, rtol=1e-4)


def test_lean_score_steps_aside_for_hooks_and_adapters(model_dir: Path) -> None:
    value = ScalarHeadModel.from_pretrained(model_dir)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    index = last_token_index(mask)
    handle = value.backbone.h[0].register_forward_hook(lambda *_: None)
    assert last_token_hidden(value.backbone, ids, mask, index) is None
    calls = []
    value.backbone.register_forward_hook(lambda *_: calls.append(1))
    value.score(ids, mask)  # falls back to the full forward, where the hooks run
    assert calls == [1]
    handle.remove()
    assert last_token_hidden(nn.Linear(2, 2), ids, mask, index) is None
    own = []
    value.register_forward_hook(lambda *_: own.append(1))
    value.score(ids, mask)  # a hook on the reward model itself: its forward runs
    assert own == [1]


def test_score_applies_normalisation(model_dir: Path) -> None:
    value = ScalarHeadModel.from_pretrained(model_dir)
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        raw = value.score(ids, mask)
        value.mean.fill_(1.5)
        value.std.fill_(4.0)
        torch.testing.assert_close(value.score(ids, mask), (raw - 1.5) / 4.0)


def test_scalar_head_save_load_round_trip(tmp_path: Path, model_dir: Path) -> None:
    torch.manual_seed(1)
    value = ScalarHeadModel.from_pretrained(model_dir)
    with torch.no_grad():
        value.head.bias.fill_(0.25)
        value.mean.fill_(0.5)
        value.std.fill_(2.0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = value.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    # A transformers sequence-classification folder, not the legacy head files.
    assert is_scalar_head_folder(out) and not (out / HEAD_WEIGHTS_NAME).exists()
    assert not (out / HEAD_CONFIG_NAME).exists()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]

    torch.manual_seed(99)  # a different RNG state must not matter when the head is loaded
    loaded = ScalarHeadModel.from_pretrained(out)
    seqs = [tokenizer.encode(t) for t in ["the cat", "a small bird sat on a tree!"]]
    batch = tokenizer.pad({"input_ids": seqs}, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.score(batch["input_ids"], batch["attention_mask"]),
            value.score(batch["input_ids"], batch["attention_mask"]),
            rtol=0,
            atol=0,
        )
    assert (loaded.mean.item(), loaded.std.item()) == (0.5, 2.0)
    assert AutoTokenizer.from_pretrained(out).pad_token == SPECIAL_TOKENS["pad_token"]


def test_fuse_tanh_gelu_keeps_the_outputs(model_dir: Path) -> None:
    """A gelu_new model gives the same logits once its activations are swapped for fused ones."""
    config = AutoConfig.from_pretrained(model_dir)
    assert config.activation_function == "gelu_pytorch_tanh"  # what build_tiny_model writes
    config.activation_function = "gelu_new"
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert models.fuse_tanh_gelu(model) == config.n_layer
        after = model(input_ids=ids).logits
    assert models.fuse_tanh_gelu(model) == 0
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
