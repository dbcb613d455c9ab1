"""Tiny causal LMs of the common architectures, built locally from configs.

For examples and tests that must not download anything: a byte-level BPE tokenizer trained on
a corpus (:func:`alignkit.models.train_tokenizer`), optionally with ChatML turn markers and a
chat template, and a freshly initialised Llama, Qwen2, Mistral, Gemma, GPT-NeoX or GPT-2
model of a few million parameters. The folder loads with ``AutoModelForCausalLM`` and
``AutoTokenizer`` like any hub model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import ConfigError
from alignkit.io import atomic_directory
from alignkit.models import train_tokenizer
from alignkit.models.flops import GATED_MLP_TYPES

__all__ = [
    "ARCHITECTURES",
    "CHATML_TEMPLATE",
    "TinyArchSpec",
    "build_tiny_causal_lm",
    "tiny_arch_spec",
    "tiny_config",
]

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma", "gpt_neox", "gpt2")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, the format of Qwen's and many other instruct models: each turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class TinyArchSpec:
    """Shape of a tiny model; ``head_dim = hidden // heads`` is 32 at the defaults."""

    arch: str = "llama"
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 256
    chat: bool = True
    """Add ChatML turn markers and a chat template to the tokenizer."""
    seed: int = 0


def default_intermediate(arch: str, hidden: int) -> int:
    """MLP width of ``arch`` at the parameter count of GPT-2's ``4 * hidden`` MLP: two
    ``hidden x 4 hidden`` matrices, or three gated ones of the multiple of 8 nearest
    ``8/3 * hidden``."""
    if arch not in GATED_MLP_TYPES:
        return 4 * hidden
    return max(8, round(8 * hidden / 3 / 8) * 8)


def tiny_arch_spec(tiny: Any, seed: int) -> TinyArchSpec:
    """The :class:`TinyArchSpec` of a ``model.tiny`` config (``TinyModelConfig``).

    No chat template: the built-in task's prompts are plain text, as with the default GPT-2.
    """
    arch = str(tiny.arch)
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"model.tiny.arch: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    hidden, heads = int(tiny.n_embd), int(tiny.n_head)
    intermediate = tiny.get("intermediate")
    kv_heads = tiny.get("kv_heads")
    return TinyArchSpec(
        arch=arch,
        vocab_size=int(tiny.vocab_size),
        hidden=hidden,
        layers=int(tiny.n_layer),
        heads=heads,
        kv_heads=int(kv_heads) if kv_heads else heads,
        intermediate=int(intermediate) if intermediate else default_intermediate(arch, hidden),
        max_positions=int(tiny.n_positions),
        chat=False,
        seed=seed,
    )


def tiny_config(spec: TinyArchSpec, tok: Any) -> Any:
    """The ``transformers`` config of ``spec`` over the trained tokenizer ``tok``."""
    from transformers import AutoConfig

    ids = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if spec.arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_positions=spec.max_positions,
            **ids,
        )
    if spec.arch == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False,
            **ids,
        )
    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.arch!r}; known: {', '.join(ARCHITECTURES)}")
    extra = {"head_dim": spec.hidden // spec.heads} if spec.arch == "gemma" else {}
    return AutoConfig.for_model(
        spec.arch,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        **extra,
        **ids,
    )


def build_tiny_causal_lm(
    out_dir: str | os.PathLike[str], corpus: Iterable[str], spec: TinyArchSpec | None = None
) -> Path:
    """Train a tokenizer on ``corpus`` and save a seeded, freshly initialised model with it.

    With ``spec.chat`` the tokenizer gets ``<|im_start|>`` / ``<|im_end|>`` as special tokens,
    the ChatML template, and ``<|im_end|>`` as the end-of-turn token that the generation config
    lists beside EOS. Written atomically; the caller's global RNG is left alone.
    """
    from transformers import AutoModelForCausalLM

    spec = spec or TinyArchSpec()
    out_dir = Path(out_dir).expanduser()
    tok = train_tokenizer(corpus, spec.vocab_size, model_max_length=spec.max_positions)
    if spec.chat:
        tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        tok.chat_template = CHATML_TEMPLATE
    config = tiny_config(spec, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id
    stops = [tok.eos_token_id]
    if spec.chat:
        stops.append(tok.convert_tokens_to_ids(IM_END))
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tiny_arch_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out_dir
