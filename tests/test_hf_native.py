"""Reward models and critics as real transformers sequence-classification models, `alignkit
export` of every model kind, and the refusal of DCP metadata that would run code."""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    pipeline,
)

from alignkit.backends.safe_dcp import read_dcp_metadata
from alignkit.cli.export import detect_kind, export, main
from alignkit.engine.checkpoint import LATEST, LEGACY_HF_DIR, model_config_dir, write_model_config
from alignkit.errors import ConfigError
from alignkit.models import (
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    ModelLoadError,
    ScalarHeadModel,
    fold_normalization,
    is_scalar_head_folder,
    sequence_classification_class,
    train_tokenizer,
    unfold_normalization,
)

CORPUS = [
    f"{s} {v} {o}"
    for s in ("the cat", "a dog", "my friend", "the old man")
    for v in ("sat on", "ran to", "looked at")
    for o in ("the mat.", "a tree!", "the park.")
]
TEXTS = ["the cat sat on the mat.", "a dog", "my friend looked at the park!", "the old man"]
BIAS, MEAN, STD = 0.3, 0.7, 2.5  # alignkit's head bias and normalisation in every test model
OFFSET = (BIAS - MEAN) / STD  # -0.16: what a bias-free HF head leaves to config.reward_offset


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer(CORPUS, 300, model_max_length=64)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return tokenizer


def _ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }


# Two layers, hidden 32-64, head_dim 32; built from configs, never downloaded.
ARCHS: dict[str, Callable[[dict[str, int]], PretrainedConfig]] = {
    "gpt2": lambda ids: GPT2Config(n_embd=32, n_layer=2, n_head=1, n_positions=64, **ids),
    "llama": lambda ids: LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **ids,
    ),
    "qwen2": lambda ids: Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **ids,
    ),
    "gpt_neox": lambda ids: GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        **ids,
    ),
}


def _scalar_model(config: PretrainedConfig, seed: int = 0) -> ScalarHeadModel:
    """A ScalarHeadModel on a fresh causal LM, with a non-trivial bias and normalisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ScalarHeadModel(AutoModelForCausalLM.from_config(config))
    with torch.no_grad():
        model.head.bias.fill_(BIAS)
        model.mean.fill_(MEAN)
        model.std.fill_(STD)
    return model.eval()


def _save_legacy(model: ScalarHeadModel, tok: PreTrainedTokenizerFast, out: Path) -> Path:
    """The layout of earlier versions: backbone + scalar_head.safetensors + scalar_head.json."""
    model.backbone.save_pretrained(out)
    head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, out / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})
    meta = {"hidden_size": model.hidden_size, "mean": MEAN, "std": STD}
    (out / HEAD_CONFIG_NAME).write_text(json.dumps(meta))
    tok.save_pretrained(out)
    return out


def _batch(tok: PreTrainedTokenizerFast, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    seqs = [[*tok.encode(t), tok.eos_token_id] for t in texts]
    return tok.pad({"input_ids": seqs}, padding_side="right", return_tensors="pt")


def _scores(model: ScalarHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.score(batch["input_ids"], batch["attention_mask"])


def _hf_scores(folder: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF logits + config.reward_offset of the folder, loaded with no missing/unexpected key."""
    seq, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = seq.eval()(**batch).logits
    assert logits.shape == (batch["input_ids"].shape[0], 1)
    return logits.squeeze(-1) + seq.config.reward_offset


@pytest.fixture(scope="module")
def saved(
    tok: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[ScalarHeadModel, Path, Path]]:
    """Per architecture: (model, folder in the HF layout, folder in the legacy layout)."""
    root = tmp_path_factory.mktemp("scalar")
    out = {}
    for i, (name, make) in enumerate(ARCHS.items()):
        model = _scalar_model(make(_ids(tok)), seed=i)
        new = model.save_pretrained(root / name / "hf", tok)
        out[name] = (model, new, _save_legacy(model, tok, root / name / "legacy"))
    return out


# -------------------------------------------------------------------------------------------
# the folded head, by hand
# -------------------------------------------------------------------------------------------


def test_fold_and_unfold_normalisation_by_hand() -> None:
    w, b = torch.tensor([[2.0, -4.0]]), torch.tensor([1.0])
    # (w.h + 1 - 3) / 2 = [1, -2].h - 1
    weight, bias, offset = fold_normalization(w, b, mean=3.0, std=2.0, head_bias=False)
    assert weight.tolist() == [[1.0, -2.0]] and bias is None and offset == -1.0
    weight, bias, offset = fold_normalization(w, b, mean=3.0, std=2.0, head_bias=True)
    assert bias is not None and bias.tolist() == [-1.0] and offset == 0.0
    # alignkit's split comes back: w = 2 [1, -2], b = 2 (0 + -1) + 3 = 1
    back = unfold_normalization(torch.tensor([[1.0, -2.0]]), None, -1.0, {"mean": 3.0, "std": 2})
    assert back[0].tolist() == [[2.0, -4.0]] and back[1].tolist() == [1.0] and back[2:] == (3, 2)
    # A folder without alignkit's split: bias as stored, the offset becomes the mean.
    w2, b2, mean, std = unfold_normalization(
        torch.tensor([[1.0, -2.0]]), torch.tensor([0.5]), -1.0, None
    )
    assert w2.tolist() == [[1.0, -2.0]] and b2.tolist() == [0.5] and (mean, std) == (1.0, 1.0)
    with pytest.raises(ValueError, match="std > 0"):
        fold_normalization(w, b, mean=0.0, std=0.0, head_bias=False)


# -------------------------------------------------------------------------------------------
# save: an HF sequence classifier per architecture
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_folder_is_an_hf_sequence_classifier_with_alignkit_scores(
    arch: str, saved: dict, tok: PreTrainedTokenizerFast
) -> None:
    model, folder, _ = saved[arch]
    config = json.loads((folder / "config.json").read_text())
    expected_class = sequence_classification_class(model.config).__name__
    assert expected_class.endswith("ForSequenceClassification")
    assert config["architectures"] == [expected_class]
    assert config["model_type"] == model.config.model_type
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == tok.pad_token_id
    assert config["problem_type"] == "regression"
    assert config["reward_offset"] == pytest.approx(OFFSET, abs=1e-7)
    assert config["alignkit_normalization"] == pytest.approx({"mean": MEAN, "std": STD})
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not (folder / HEAD_WEIGHTS_NAME).exists() and not (folder / HEAD_CONFIG_NAME).exists()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []

    batch = _batch(tok)
    ours = _scores(model, batch)
    assert len(set(ours.tolist())) == len(TEXTS)  # reading a wrong position would show
    torch.testing.assert_close(_hf_scores(folder, batch), ours, atol=1e-5, rtol=0)
    # The stored head is w / std; the pairwise differences need no offset at all.
    seq = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(seq.score.weight, model.head.weight / STD, atol=1e-7, rtol=1e-6)
    assert seq.score.bias is None
    with torch.no_grad():
        logits = seq.eval()(**batch).logits.squeeze(-1)
    torch.testing.assert_close(logits[0] - logits[1], ours[0] - ours[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_text_classification_pipeline_gives_the_score(
    arch: str, saved: dict, tok: PreTrainedTokenizerFast
) -> None:
    model, folder, _ = saved[arch]
    text = "my friend sat on a tree!"
    pipe = pipeline("text-classification", model=str(folder), device="cpu")
    out = pipe(text, function_to_apply="none")
    result = out[0] if isinstance(out, list) else out
    default = pipe(text)  # problem_type "regression": no sigmoid by default either
    assert (default[0] if isinstance(default, list) else default)["score"] == result["score"]
    ids = torch.tensor([tok.encode(text)])
    offset = AutoConfig.from_pretrained(folder).reward_offset
    expected = _scores(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert result["score"] + offset == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_from_pretrained_restores_the_head_as_trained(
    arch: str, saved: dict, tok: PreTrainedTokenizerFast
) -> None:
    model, folder, legacy = saved[arch]
    torch.manual_seed(99)  # a different RNG state must not matter
    loaded = ScalarHeadModel.from_pretrained(folder)
    assert (loaded.mean.item(), loaded.std.item()) == pytest.approx((MEAN, STD))
    assert loaded.head.bias.item() == pytest.approx(BIAS, abs=1e-6)
    torch.testing.assert_close(loaded.head.weight, model.head.weight, atol=1e-6, rtol=1e-6)
    assert not hasattr(loaded.config, "reward_offset") and not loaded.training
    batch = _batch(tok)
    with torch.no_grad():  # raw per-token values, what a critic is read by
        raw = loaded(batch["input_ids"], batch["attention_mask"])
        want = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(raw, want, atol=1e-5, rtol=0)
    from_legacy = ScalarHeadModel.from_pretrained(legacy)
    torch.testing.assert_close(
        _scores(loaded, batch), _scores(from_legacy, batch), atol=1e-6, rtol=0
    )
    assert is_scalar_head_folder(folder) and is_scalar_head_folder(legacy)


def test_plain_backbone_folder_is_not_a_scalar_head_folder(
    tmp_path: Path, tok: PreTrainedTokenizerFast
) -> None:
    AutoModelForCausalLM.from_config(ARCHS["llama"](_ids(tok))).save_pretrained(tmp_path)
    assert not is_scalar_head_folder(tmp_path)
    torch.manual_seed(0)
    fresh = ScalarHeadModel.from_pretrained(tmp_path)  # a fresh head, as before
    assert fresh.head.bias.item() == 0.0 and (fresh.mean.item(), fresh.std.item()) == (0.0, 1.0)


def test_folder_written_by_another_tool_reads_its_offset_as_the_mean(
    saved: dict, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model, folder, _ = saved["qwen2"]
    seq = AutoModelForSequenceClassification.from_pretrained(folder)
    del seq.config.alignkit_normalization  # another tool keeps reward_offset, not our split
    seq.save_pretrained(tmp_path / "other")
    loaded = ScalarHeadModel.from_pretrained(tmp_path / "other")
    assert loaded.head.bias.item() == 0.0 and loaded.std.item() == 1.0
    assert loaded.mean.item() == pytest.approx(-OFFSET)
    torch.testing.assert_close(loaded.head.weight, seq.score.weight)
    batch = _batch(tok)
    torch.testing.assert_close(_scores(loaded, batch), _scores(model, batch), atol=1e-5, rtol=0)

    # A plain HF reward model (no reward_offset): the score is its logit.
    config = ARCHS["gpt2"](_ids(tok))
    config.num_labels = 1
    plain = AutoModelForSequenceClassification.from_config(config).eval()
    plain.save_pretrained(tmp_path / "plain")
    assert is_scalar_head_folder(tmp_path / "plain")
    ours = ScalarHeadModel.from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(
            _scores(ours, batch), plain(**batch).logits.squeeze(-1), atol=1e-5, rtol=0
        )


def test_multi_label_classifier_and_missing_head_are_refused(
    tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    config = ARCHS["gpt2"](_ids(tok))
    config.num_labels = 3
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "three")
    assert not is_scalar_head_folder(tmp_path / "three")
    with pytest.raises(ModelLoadError, match="3 labels"):
        ScalarHeadModel.from_pretrained(tmp_path / "three")
    # A classifier config over backbone-only weights: HF would init a random head silently.
    GPT2Model(config).save_pretrained(tmp_path / "headless")
    meta = json.loads((tmp_path / "headless" / "config.json").read_text())
    meta.update(architectures=["GPT2ForSequenceClassification"], id2label={"0": "LABEL_0"})
    (tmp_path / "headless" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="missing"):
        ScalarHeadModel.from_pretrained(tmp_path / "headless")


def test_architecture_without_a_sequence_classifier_is_refused(tmp_path: Path) -> None:
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=16,
    )
    model = ScalarHeadModel(CLIPTextModel(config))
    with pytest.raises(ModelLoadError, match="'clip_text_model' has no sequence-classification"):
        model.save_pretrained(tmp_path / "rm")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# A decoder whose sequence-classification head has a bias: the offset folds into it.
class BiasedConfig(GPT2Config):
    model_type = "alignkit_test_biased_gpt2"


class BiasedModel(GPT2Model):
    config_class = BiasedConfig


class BiasedForSequenceClassification(GPT2ForSequenceClassification):
    config_class = BiasedConfig

    def __init__(self, config: BiasedConfig) -> None:
        super().__init__(config)
        self.transformer = BiasedModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=True)
        self.post_init()


def test_head_with_a_bias_holds_the_whole_score(
    tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    AutoConfig.register(BiasedConfig.model_type, BiasedConfig, exist_ok=True)
    AutoModel.register(BiasedConfig, BiasedModel, exist_ok=True)
    AutoModelForSequenceClassification.register(
        BiasedConfig, BiasedForSequenceClassification, exist_ok=True
    )
    config = BiasedConfig(n_embd=32, n_layer=2, n_head=1, n_positions=64, **_ids(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = ScalarHeadModel(BiasedModel(config))
    with torch.no_grad():
        model.head.bias.fill_(BIAS)
        model.mean.fill_(MEAN)
        model.std.fill_(STD)
    folder = model.train().save_pretrained(tmp_path / "rm", tok)
    assert model.backbone.training  # saving mid-training leaves the mode alone
    model.eval()
    seq = AutoModelForSequenceClassification.from_pretrained(folder)
    assert isinstance(seq, BiasedForSequenceClassification)
    assert seq.config.reward_offset == 0.0
    assert seq.score.bias.item() == pytest.approx(OFFSET, abs=1e-6)
    batch = _batch(tok)
    with torch.no_grad():
        logits = seq.eval()(**batch).logits.squeeze(-1)  # no offset to add
    torch.testing.assert_close(logits, _scores(model, batch), atol=1e-5, rtol=0)
    back = ScalarHeadModel.from_pretrained(folder)
    assert back.head.bias.item() == pytest.approx(BIAS, abs=1e-6)
    torch.testing.assert_close(_scores(back, batch), _scores(model, batch), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------
# export
# -------------------------------------------------------------------------------------------


def _write_checkpoint(
    root: Path,
    policy: nn.Module,
    tok: PreTrainedTokenizerFast,
    critic: nn.Module | None,
    layout: str = "safetensors",
    config_dir: str | None = None,
) -> Path:
    """An RL checkpoint as the backends write it: weights, config folder, state.json, latest."""
    step = root / "step_000001"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 1}))
    write_model_config(policy, tok, step / "model_config")
    if config_dir is not None:
        (step / "model_config").rename(step / config_dir)
    for module, folder in ((policy, step), (critic, step / "value_model")):
        if module is None:
            continue
        folder.mkdir(exist_ok=True)
        if layout == "dcp":
            import torch.distributed.checkpoint as dcp

            with pytest.warns(UserWarning):  # DCP notes that it runs without a process group
                dcp.save({"model": module.state_dict()}, checkpoint_id=folder / "dcp")
        else:
            save_model(module, str(folder / "model.safetensors"))
    (root / LATEST).write_text(step.name + "\n")
    return step


@pytest.fixture(scope="module")
def policy(tok: PreTrainedTokenizerFast) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return AutoModelForCausalLM.from_config(ARCHS["llama"](_ids(tok))).eval()


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["safetensors", "dcp"])
def test_export_policy_and_critic_of_an_rl_checkpoint(
    layout: str,
    policy: nn.Module,
    saved: dict,
    tok: PreTrainedTokenizerFast,
    tmp_path: Path,
) -> None:
    critic = _scalar_model(policy.config, seed=3)
    step = _write_checkpoint(tmp_path / "checkpoints", policy, tok, critic, layout)
    assert model_config_dir(step) == step / "model_config" and not (step / "hf").exists()
    assert detect_kind(tmp_path / "checkpoints") == "policy"
    assert detect_kind(step / "value_model") == "critic"

    assert main([str(tmp_path / "checkpoints"), str(tmp_path / "policy")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    _assert_same_weights(exported, policy)
    assert AutoTokenizer.from_pretrained(tmp_path / "policy").pad_token == tok.pad_token

    assert main([str(step), str(tmp_path / "critic"), "--kind", "critic"]) == 0
    batch = _batch(tok)
    torch.testing.assert_close(
        _hf_scores(tmp_path / "critic", batch), _scores(critic, batch), atol=1e-5, rtol=0
    )
    # The critic's raw per-token values (what PPO reads) survive the round trip.
    back = ScalarHeadModel.from_pretrained(tmp_path / "critic")
    with torch.no_grad():
        torch.testing.assert_close(
            back(batch["input_ids"], batch["attention_mask"]),
            critic(batch["input_ids"], batch["attention_mask"]),
            atol=1e-5,
            rtol=0,
        )
    # SRC may be the critic subfolder itself.
    kind, out = export(step / "value_model", tmp_path / "critic2")
    assert kind == "critic" and is_scalar_head_folder(out)


def test_export_old_checkpoint_with_hf_folder_and_a_shared_value_head(
    policy: nn.Module, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    step = _write_checkpoint(tmp_path / "ck", policy, tok, None, config_dir=LEGACY_HF_DIR)
    assert model_config_dir(step) == step / LEGACY_HF_DIR
    head = nn.Linear(policy.config.hidden_size, 1)
    with torch.no_grad():
        head.bias.fill_(0.5)
    (step / "value_model").mkdir()
    save_model(head, str(step / "value_model" / "model.safetensors"))

    kind, out = export(tmp_path / "ck", tmp_path / "policy")
    assert kind == "policy"
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(out), policy)
    kind, out = export(tmp_path / "ck", tmp_path / "critic", "critic")
    batch = _batch(tok)
    with torch.no_grad():  # the head on the policy's last hidden state, at the last token
        hidden = policy(**batch, output_hidden_states=True).hidden_states[-1]
        last = batch["attention_mask"].sum(1) - 1
        want = head(hidden[torch.arange(len(TEXTS)), last]).squeeze(-1)
    torch.testing.assert_close(_hf_scores(out, batch), want, atol=1e-5, rtol=0)


def test_export_critic_that_does_not_fit_the_policy_names_the_option(
    policy: nn.Module, saved: dict, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    other, folder, _ = saved["gpt2"]  # started from algorithm.value_model_path=<gpt2 folder>
    step = _write_checkpoint(tmp_path / "ck", policy, tok, other)
    with pytest.raises(ConfigError, match="--critic-config"):
        export(step, tmp_path / "bad", "critic")
    _, out = export(step, tmp_path / "critic", "critic", critic_config=folder)
    batch = _batch(tok)
    torch.testing.assert_close(_hf_scores(out, batch), _scores(other, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_export_legacy_reward_model_and_ensemble(
    arch: str, saved: dict, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model, _, legacy = saved[arch]
    assert detect_kind(legacy) == "reward"
    assert main([str(legacy), str(tmp_path / "rm")]) == 0
    batch = _batch(tok)
    torch.testing.assert_close(
        _hf_scores(tmp_path / "rm", batch), _scores(model, batch), atol=1e-5, rtol=0
    )

    ensemble = tmp_path / "ensemble"
    for i in range(2):
        _save_legacy(model, tok, ensemble / f"member_{i}")
    kind, out = export(ensemble, tmp_path / "ensemble_hf")
    assert kind == "reward" and sorted(p.name for p in out.iterdir()) == ["member_0", "member_1"]
    for member in out.iterdir():
        torch.testing.assert_close(
            _hf_scores(member, batch), _scores(model, batch), atol=1e-5, rtol=0
        )


def test_export_lora_checkpoint_and_adapter_folder_merge(
    tok: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("peft", reason="LoRA needs the optional 'lora' extra (peft)")
    from alignkit.models.lora import apply_lora

    config = ARCHS["gpt2"](_ids(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        base = AutoModelForCausalLM.from_config(config)
        base.save_pretrained(tmp_path / "base")
        tok.save_pretrained(tmp_path / "base")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        lora = apply_lora(base, r=2, alpha=4.0)
        with torch.no_grad():  # B starts at 0; a trained adapter moves the merged weights
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
    batch = _batch(tok)
    with torch.no_grad():
        want = lora(**batch).logits
    step = _write_checkpoint(tmp_path / "ck", lora, tok, None)
    assert (step / "model_config" / "lora" / "adapter_config.json").is_file()
    kind, out = export(tmp_path / "ck", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert kind == "policy" and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)

    lora.save_pretrained(tmp_path / "adapter")  # peft's own adapter folder
    assert detect_kind(tmp_path / "adapter") == "policy"
    _, out = export(tmp_path / "adapter", tmp_path / "merged2")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(**batch).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)

    monkeypatch.setitem(sys.modules, "peft", None)  # without peft: a clear error
    with pytest.raises(ConfigError, match="needs the optional 'peft'"):
        export(tmp_path / "ck", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_export_refuses_what_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a complete alignkit checkpoint" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "state.json").write_text("{}")
    assert main([str(tmp_path / "x"), str(tmp_path / "out"), "--kind", "critic"]) == 2
    assert "holds no critic" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------
# untrusted DCP metadata
# -------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickles into a call of os.system: what a crafted checkpoint could hide."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(
    policy: nn.Module, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    step = _write_checkpoint(tmp_path / "ck", policy, tok, None, layout="dcp")
    metadata = step / "dcp" / ".metadata"
    assert read_dcp_metadata(step / "dcp").state_dict_metadata  # the real one reads fine
    marker = tmp_path / "ran"
    metadata.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))
    with pytest.raises(ConfigError, match=r"\.metadata: refusing .*(posix|os|nt)\.system"):
        export(tmp_path / "ck", tmp_path / "out")
    assert main([str(tmp_path / "ck"), str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_dcp_item_stored_as_pickled_bytes_is_refused(
    policy: nn.Module, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """DCP reads bytes items with torch.load(weights_only=False): a tensor key must be a tensor."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step = _write_checkpoint(tmp_path / "ck", policy, tok, None, layout="dcp")
    meta = read_dcp_metadata(step / "dcp")
    key = next(iter(meta.state_dict_metadata))
    meta.state_dict_metadata[key] = BytesStorageMetadata()
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ConfigError, match="is not stored as a tensor"):
        export(tmp_path / "ck", tmp_path / "out")

    meta.state_dict_metadata.pop(key)
    info = next(iter(meta.storage_data.values()))
    info.relative_path = "../../outside.distcp"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ConfigError, match="outside the checkpoint folder"):
        export(tmp_path / "ck", tmp_path / "out")
