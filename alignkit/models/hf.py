"""Model building, loading and the scalar (value / reward) head.

Shapes: B = batch, P = prompt length, R = response length, T = P + R, V = vocabulary size,
H = hidden size. Sequences are laid out as ``[left-padded prompt | right-padded response]`` so
that every prompt ends at column P - 1 and every response starts at column P.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType, MethodType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from alignkit.errors import AlignkitError
from alignkit.io import atomic_directory
from alignkit.models.lean import (
    last_token_hidden,
    lean_decoder,
    packed_last_hidden,
    packed_logits,
    packed_states,
)
from alignkit.models.packing import PackedSequences, pack_sequences
from alignkit.rl.ops import entropy_from_logits, float32_linear, logprobs_from_logits

__all__ = [
    "SPECIAL_TOKENS",
    "ModelLoadError",
    "ScalarHeadModel",
    "TinyModelSpec",
    "build_tiny_model",
    "count_parameters",
    "disable_dropout",
    "float32_lm_head",
    "fold_normalization",
    "is_scalar_head_folder",
    "last_token_index",
    "load_causal_lm",
    "pack_rollout",
    "packs",
    "position_ids_from_mask",
    "response_logprobs",
    "response_read",
    "sequence_classification_class",
    "sequence_logprobs",
    "supports_logits_to_keep",
    "train_tokenizer",
    "unfold_normalization",
]

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"

# Keyed by the tokenizer attribute names so it can be splatted into a tokenizer constructor.
# The pad token is deliberately distinct from EOS: if they were equal, masking padding would also
# mask the EOS the policy must learn to emit. BOS reuses EOS, as in GPT-2.
SPECIAL_TOKENS: MappingProxyType[str, str] = MappingProxyType(
    {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
)

HEAD_WEIGHTS_NAME = "scalar_head.safetensors"
HEAD_CONFIG_NAME = "scalar_head.json"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_TRUE_ENV = ("1", "ON", "YES", "TRUE")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class ModelLoadError(AlignkitError, ValueError):
    """A model or tokenizer could not be found or loaded; the message names the source."""


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def _looks_like_local_path(name: str) -> bool:
    """Whether ``name`` means a filesystem path rather than a Hub id (``name`` / ``org/name``)."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    if os.path.isdir(name):
        return True
    # A Hub id has at most one "/"; anything deeper (or a Windows separator) is a path.
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read at each call.

    huggingface_hub reads these variables once, when it is imported; reading them here too means
    a value set later (by a launcher, a test, a notebook) still stops every download.
    """
    return any(os.environ.get(k, "").strip().upper() in _TRUE_ENV for k in _OFFLINE_ENV)


def _in_hub_cache(name: str, revision: str | None) -> bool:
    """Whether the hub cache holds ``name``'s ``config.json`` (no network is touched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (HFValidationError): it cannot be cached either
        return False
    return isinstance(found, str)


def _names_missing_folder(name: str) -> bool:
    """Whether ``name`` (``a/b``) starts with a folder that exists here but does not continue.

    ``runs/sft`` is also a well-formed hub id; when ``runs/`` is a local folder the user meant
    a path, and sending it to the hub would only wait on the network before failing.
    """
    head, sep, _ = name.partition("/")
    return bool(sep) and os.path.isdir(head) and not os.path.exists(name)


def _resolve_source(name_or_path: str | os.PathLike[str], revision: str | None = None) -> str:
    """Expand a local path; fail at once, naming it, when it cannot be loaded without a wait.

    A path that does not exist, or (offline) a hub id that is not in the local cache, raises
    :class:`ModelLoadError` here instead of after the hub client's network retries.
    """
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, Path) or _looks_like_local_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path does not exist: {name}")
        return str(path)
    if os.path.exists(name):
        return name
    if _names_missing_folder(name):
        raise ModelLoadError(
            f"model path does not exist: {name} (the folder {name.partition('/')[0]!r} exists "
            "here, so it is not taken for a hub id)"
        )
    if hub_offline() and not _in_hub_cache(name, revision):
        raise ModelLoadError(
            f"model {name!r} is neither a local folder nor a model in the hub cache, and "
            "HF_HUB_OFFLINE is set (nothing is downloaded)"
        )
    return name


def _hub_kwargs(trust_remote_code: bool, revision: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments; offline (read now) means local files only."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if hub_offline():
        kwargs["local_files_only"] = True
    return kwargs


def _corrupt_weights(source: str) -> Path | None:
    """The first ``*.safetensors`` file of the folder ``source`` whose header does not parse."""
    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return None


def _load_error(
    name_or_path: str | os.PathLike[str], source: str, exc: Exception
) -> ModelLoadError:
    """A ModelLoadError naming the model and, for corrupt weights, the file at fault.

    safetensors' own message ("Error while deserializing header: ...") names no file.
    """
    name = os.fspath(name_or_path)
    if isinstance(exc, SafetensorError):
        bad = _corrupt_weights(source)
        what = f"weights file {bad}" if bad is not None else "a safetensors weights file"
        return ModelLoadError(
            f"could not load {name!r}: {what} is corrupt or truncated ({exc}); save or "
            "download the model again"
        )
    return ModelLoadError(f"could not load {name!r}: {exc}")


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _hidden_size(config: PretrainedConfig) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot determine the hidden size of {type(config).__name__}")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights, e.g. GPT-2's embedding/LM head, count once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Tokenizer and tiny model
# --------------------------------------------------------------------------------------------


@dataclass
class TinyModelSpec:
    """Shape of a small GPT-2 style model (about 3.5M parameters at the defaults)."""

    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 128
    seed: int = 0


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int, *, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (as in GPT-2) on ``corpus``.

    Byte-level pre-tokenisation plus the matching decoder makes ``decode(encode(s)) == s`` for
    every string, and the 256-byte initial alphabet means there is never an unknown token. The
    returned tokenizer pads on the left, which is what batched generation needs.

    ``vocab_size`` is an upper bound: a small corpus may support fewer merges.
    """
    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size must be at least {len(alphabet) + len(specials)} "
            "(256 byte symbols plus the special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        padding_side="left",
        # The default clean-up rewrites " ." to "." and would break the exact round trip.
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    corpus: Iterable[str],
    spec: TinyModelSpec | None = None,
) -> Path:
    """Train a tokenizer on ``corpus`` and save a freshly initialised GPT-2 model with it.

    The model's vocabulary is the trained tokenizer's size (at most ``spec.vocab_size``), so every
    id the model can emit decodes to text. Weights depend only on ``spec`` (seeded from
    ``spec.seed`` without touching the caller's global RNG state). The folder is written
    atomically and loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Returns:
        ``out_dir`` as a Path.
    """
    spec = spec if spec is not None else TinyModelSpec()
    out_dir = Path(out_dir).expanduser()
    tokenizer = train_tokenizer(corpus, spec.vocab_size, model_max_length=spec.n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # GPT-2's tanh GELU as one fused kernel; the default "gelu_new" computes the same
        # formula as seven element-wise ops (17% of an RL step's CPU time in the profile).
        activation_function="gelu_pytorch_tanh",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = GPT2LMHeadModel(config)
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors is the default serialisation
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_model_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def disable_dropout(model: nn.Module) -> None:
    """Turn off every dropout in ``model``, even in train mode.

    RL objectives compare log-probs of the same tokens across forward passes (e.g. the PPO ratio
    of Schulman et al., 2017, Eq. 6); dropout noise would make that ratio differ from 1 with
    unchanged weights. Covers ``nn.Dropout*`` modules, float ``*dropout*`` attributes that some
    attention modules read at call time, and the ``*dropout*`` / ``*_pdrop`` config fields.
    """
    seen_configs: set[int] = set()
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            _zero_config_dropout(config, seen_configs)


def _zero_config_dropout(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):  # nested text/vision sub-configs
            _zero_config_dropout(value, seen)
        elif ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)


def _prepare_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding and a pad token distinct from EOS, resizing embeddings when one is added."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ModelLoadError(f"pad token id equals eos token id ({tokenizer.eos_token_id})")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for RL.

    A local-looking ``name_or_path`` that does not exist, or (with ``HF_HUB_OFFLINE``) a hub id
    missing from the cache, raises :class:`ModelLoadError` naming it at once; anything else is
    handed to ``from_pretrained`` (Hub ids included), and its errors, corrupt weights files
    included, are re-raised as :class:`ModelLoadError` naming the model (and the bad file).

    The tokenizer pads on the left; a missing pad token (or one equal to EOS) is replaced by
    ``"<|pad|>"`` and the embeddings are resized. The model is returned in eval mode with dropout
    disabled so log-probs are deterministic.
    """
    source = _resolve_source(name_or_path, revision)
    kwargs = _hub_kwargs(trust_remote_code, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype), **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise _load_error(name_or_path, source, exc) from exc
    _prepare_tokenizer(model, tokenizer)
    fuse_tanh_gelu(model)
    model.to(device)
    disable_dropout(model)
    model.eval()
    return model, tokenizer


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Swap ``gelu_new`` activations for the fused kernel of the same formula, in place.

    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` is what both compute (outputs agree to
    about 1e-6); ``torch.nn.functional.gelu(x, approximate="tanh")`` does it in one kernel
    instead of seven, forward and backward. Returns the number of modules swapped.
    """
    from transformers.activations import ACT2FN, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    return swapped


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token.

    Args:
        mask: (B, T) attention mask, left padding allowed.

    Returns:
        (B, T) long tensor ``cumsum(mask) - 1`` clamped at 0, so a left-padded prompt sees the
        same absolute positions as the unpadded one (learned position embeddings would otherwise
        shift by the amount of padding).
    """
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_token_index(mask: Tensor) -> Tensor:
    """(B, T) mask -> (B,) index of the last 1 on each row (0 for an all-zero row).

    Works for left and right padding: positions are weighted by ``arange(T)`` so the largest
    weighted entry is the last valid one.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.long() * positions).argmax(dim=-1)


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``logits_to_keep`` (projects only the last positions)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _float32_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear.forward`` in float32 with autocast off (bound to one head by
    :func:`float32_lm_head`)."""
    return float32_linear(x, self.weight, self.bias)


@contextlib.contextmanager
def float32_lm_head(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s own forward computes its logits in float32.

    For the paths where the model's forward (not :mod:`alignkit.models.lean`) produces the logits
    of log-probs or sampling. Under bf16 autocast, or with FSDP's bf16 parameters, the LM
    head would return bf16 logits, rounded to 8 significant bits; here the head's forward is
    :func:`alignkit.rl.ops.float32_linear` on this instance for the duration, so it still runs
    inside the model's forward: FSDP has gathered the full weight there, autograd reaches
    it as usual, and no second projection is computed. The (B, T, V) logits come back
    float32. A head that is not exactly an ``nn.Linear`` (a LoRA-wrapped or quantised one)
    is left alone, and its logits are only upcast afterwards.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or "forward" in vars(head):
        yield  # not a plain head, or already switched by an enclosing block
        return
    head.forward = MethodType(_float32_forward, head)
    try:
        yield
    finally:
        del head.forward


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs of the response under ``softmax(logits / temperature)``.

    Args:
        model: causal LM returning ``.logits``.
        input_ids: (B, T) ``[left-padded prompt (B, P) | right-padded response (B, R)]``.
        attention_mask: (B, T), 1 on real tokens.
        response_start: P, the column where responses begin.
        temperature: τ used at sampling time; log-probs must use the same τ to match the
            sampling distribution.
        return_entropy: also return the (B, R) entropy of the τ-scaled distribution.

    Returns:
        (B, R) float32 log-probs (0 at response padding), or ``(logprobs, entropy)``.

    Logits at positions P-1 .. T-2 predict tokens P .. T-1. Only the last R + 1 hidden states
    go through the LM head (when the model supports ``logits_to_keep``), since prompt logits
    are never used and the (B, T, V) projection dominates memory for large vocabularies. The
    head runs in float32 under any autocast (:func:`float32_lm_head`).
    """
    total = input_ids.shape[1]
    n_resp = total - response_start
    if not 0 < response_start < total:
        raise ValueError(f"response_start must be in (0, {total}), got {response_start}")
    kwargs: dict[str, object] = {}
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = n_resp + 1
    with float32_lm_head(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            **kwargs,
        )
    logits = out.logits[:, -(n_resp + 1) : -1]  # (B, R, V): positions P-1 .. T-2
    labels, valid = input_ids[:, response_start:], attention_mask[:, response_start:] != 0
    return _token_logprobs(logits, labels, valid, temperature, return_entropy)


def _token_logprobs(
    logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, return_entropy: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """(B, R) log-probs of ``labels`` (and entropies) under (B, R, V) ``logits``, 0 where
    ``valid`` is False."""
    logprobs = logprobs_from_logits(logits, labels, temperature).masked_fill(~valid, 0.0)
    if not return_entropy:
        return logprobs
    return logprobs, entropy_from_logits(logits, temperature).masked_fill(~valid, 0.0)


def packs(model: nn.Module) -> bool:
    """Whether :func:`response_logprobs` runs ``model`` packed (a supported LM, no hooks)."""
    return lean_decoder(model) is not None


def pack_rollout(
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> PackedSequences | None:
    """The rows ``prompt | response`` packed, each distinct prompt once
    (:mod:`alignkit.models.packing`).

    Args:
        prompt_ids: (B, P) left-padded prompts; ``prompt_mask`` (B, P) 1 on real tokens.
        response_ids: (B, R) right-padded responses; ``response_mask`` (B, R).

    Returns:
        The packed rows, or None when a prompt is empty or a mask is not one contiguous run
        on its side (the packed layout assumes both).
    """
    p_len, r_len = prompt_mask.sum(1).long(), response_mask.sum(1).long()
    cols_p = torch.arange(prompt_mask.shape[1], device=prompt_mask.device)
    cols_r = torch.arange(response_mask.shape[1], device=response_mask.device)
    left = cols_p[None, :] >= prompt_mask.shape[1] - p_len[:, None]
    right = cols_r[None, :] < r_len[:, None]
    if bool((p_len < 1).any()) or not (
        torch.equal(left, prompt_mask != 0) and torch.equal(right, response_mask != 0)
    ):
        return None
    # The layout is built on the host: one copy of each tensor, not one device sync per row.
    p_ids, r_ids, left, right = (t.cpu() for t in (prompt_ids, response_ids, left, right))
    prefixes = [ids[m].tolist() for ids, m in zip(p_ids, left, strict=True)]
    suffixes = [ids[m].tolist() for ids, m in zip(r_ids, right, strict=True)]
    return pack_sequences(prefixes, suffixes).to(prompt_ids.device)


def response_read(packed: PackedSequences, prompt_mask: Tensor, response_mask: Tensor) -> Tensor:
    """(B, R) flat index of the token whose output predicts response token r of row b.

    That is row position ``P_b - 1 + r`` (the state before token r is emitted: where a
    policy's logits and a PPO critic's value are read); N at response padding.
    """
    steps = torch.arange(response_mask.shape[1], device=response_mask.device)
    cols = prompt_mask.sum(1).long()[:, None] - 1 + steps[None, :]
    read = packed.layout.gather(1, cols.clamp(max=packed.layout.shape[1] - 1))
    return read.masked_fill(response_mask == 0, packed.tokens.shape[0])


def response_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`sequence_logprobs` of ``prompt | response`` rows, packed where the model allows.

    A supported model runs packed (:func:`alignkit.models.lean.packed_logits`): the K samples of a
    prompt share its tokens, and no linear layer runs on padding. The result equals the
    padded forward's to float rounding; other models run :func:`sequence_logprobs`. Either
    way the LM head and the log-softmax run in float32, under autocast too.

    Returns:
        (B, R) float32 log-probs (0 at response padding), or ``(logprobs, entropy)``.
    """
    packed = pack_rollout(prompt_ids, prompt_mask, response_ids, response_mask)
    if packed is not None:
        valid = response_mask != 0
        logits = packed_logits(model, packed, response_read(packed, prompt_mask, response_mask))
        if logits is not None:
            return _token_logprobs(logits, response_ids, valid, temperature, return_entropy)
    seq = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return sequence_logprobs(
        model, seq, mask, prompt_ids.shape[1], temperature, return_entropy=return_entropy
    )


# --------------------------------------------------------------------------------------------
# Scalar head (value / reward models)
# --------------------------------------------------------------------------------------------

REWARD_OFFSET_KEY = "reward_offset"
"""``config.json`` key of a saved scalar model: the constant ``(b - mean) / std`` that a bias-free
HF head cannot hold, so that ``logits + reward_offset`` is alignkit's normalised score."""
NORMALIZATION_KEY = "alignkit_normalization"
"""``config.json`` key: ``{"mean": m, "std": s}``, how the folded HF head splits back into
alignkit's raw head and its normalisation (absent from folders other tools write)."""
_SEQ_CLS_SUFFIX = "ForSequenceClassification"


def _read_config_json(folder: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` of ``folder``, or None when absent or not a JSON object."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _names_scalar_classifier(architectures: Any, num_labels: Any) -> bool:
    """Whether a config names a ``*ForSequenceClassification`` architecture with one output."""
    named = any(isinstance(a, str) and a.endswith(_SEQ_CLS_SUFFIX) for a in architectures or ())
    return named and num_labels == 1


def is_scalar_head_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a trained scalar (reward / value) model that alignkit scores with.

    True for the layout :meth:`ScalarHeadModel.save_pretrained` writes (a transformers
    ``*ForSequenceClassification`` folder with one label, which includes such folders written
    by other tools) and for the legacy layout (backbone + ``scalar_head.safetensors``). False
    for a plain backbone or causal-LM folder, whose head would be freshly initialised.
    """
    folder = Path(path).expanduser()
    if (folder / HEAD_WEIGHTS_NAME).is_file():
        return True
    config = _read_config_json(folder)
    if config is None:
        return False
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) else config.get("num_labels", 2)
    return _names_scalar_classifier(config.get("architectures"), num_labels)


def sequence_classification_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers ``*ForSequenceClassification`` class of ``config``'s model type.

    Looked up in the auto mapping (which also holds classes registered with
    ``AutoModelForSequenceClassification.register``). Raises :class:`ModelLoadError` naming
    the model type when the architecture has no such class.
    """
    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"architecture {getattr(config, 'model_type', type(config).__name__)!r} has no "
            "sequence-classification class in transformers, so its reward model / critic "
            "cannot be saved as an HF model"
        ) from None


def _head_linear(seq: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of a sequence-classification model's head, outside its base model.

    Raises :class:`ModelLoadError` unless the head is one ``Linear(H, 1)``: only then is it
    the same function as alignkit's scalar head.
    """
    prefix = str(getattr(seq, "base_model_prefix", ""))
    if not prefix or not isinstance(getattr(seq, prefix, None), nn.Module):
        raise ModelLoadError(f"{type(seq).__name__} has no base model at {prefix!r}")
    owners = [
        (name, module)
        for name, module in seq.named_modules()
        if name
        and name != prefix
        and not name.startswith(prefix + ".")
        and next(module.parameters(recurse=False), None) is not None
    ]
    if len(owners) == 1 and isinstance(owners[0][1], nn.Linear):
        name, head = owners[0]
        if head.out_features == 1:
            return name, head
    raise ModelLoadError(
        f"the head of {type(seq).__name__} is not a single Linear(hidden, 1) layer "
        f"(found {[name for name, _ in owners]}); alignkit's scalar head cannot be stored in it"
    )


def fold_normalization(
    weight: Tensor, bias: Tensor, mean: float, std: float, *, head_bias: bool
) -> tuple[Tensor, Tensor | None, float]:
    """alignkit's normalised head as an HF head: ``(w.h + b - mean) / std`` as ``w'.h + c``.

    ``w' = w / std`` and ``c = (b - mean) / std``. A head with a bias holds ``c``; a bias-free
    head (most HF sequence-classification heads) cannot, and ``c`` is returned as the offset
    to add to its logits. Computed in float64, returned in ``weight``'s dtype.

    Args:
        weight: (1, H) alignkit head weight ``w``; ``bias``: (1,) head bias ``b``.
        mean, std: alignkit's normalisation (``std > 0``).
        head_bias: whether the target head has a bias.

    Returns:
        ``(w' (1, H), bias (1,) or None, offset)``; ``offset`` is 0 when the bias holds ``c``.
    """
    if not (math.isfinite(std) and std > 0 and math.isfinite(mean)):
        raise ValueError(f"normalisation must have finite mean and std > 0, got {mean}, {std}")
    folded = (weight.detach().double() / std).to(weight.dtype)
    constant = (bias.detach().double() - mean) / std  # (1,)
    if head_bias:
        return folded, constant.to(bias.dtype), 0.0
    return folded, None, float(constant.item())


def unfold_normalization(
    weight: Tensor,
    bias: Tensor | None,
    offset: float,
    normalization: dict[str, float] | None,
) -> tuple[Tensor, Tensor, float, float]:
    """An HF head ``w'.h + beta + offset`` as alignkit's ``(w.h + b - mean) / std``.

    With alignkit's saved ``{"mean": m, "std": s}``: ``w = s w'`` and ``b = s (beta + offset) + m``
    (the inverse of :func:`fold_normalization`), so raw per-token values (a critic's) come back
    as trained. Without it (a folder another tool wrote): ``w = w'``, ``b = beta`` (0 when the
    head has no bias), ``mean = -offset``, ``std = 1``. Either way the score equals
    ``logits + offset`` to float rounding.

    Returns:
        ``(w (1, H), b (1,), mean, std)`` in ``weight``'s dtype.
    """
    beta = (
        bias.detach().double()
        if bias is not None
        else torch.zeros(1, dtype=torch.float64, device=weight.device)
    )
    if normalization is None:
        return weight.detach().clone(), beta.to(weight.dtype), -offset, 1.0
    mean, std = float(normalization.get("mean", 0.0)), float(normalization.get("std", 1.0))
    if not (math.isfinite(std) and std > 0 and math.isfinite(mean)):
        raise ModelLoadError(f"{NORMALIZATION_KEY} must have finite mean and std > 0")
    unfolded = (weight.detach().double() * std).to(weight.dtype)
    return unfolded, ((beta + offset) * std + mean).to(weight.dtype), mean, std


class ScalarHeadModel(nn.Module):
    """A transformer backbone with a linear ``H -> 1`` head.

    Used per token as a PPO value model and at the last token as a reward model. ``mean`` and
    ``std`` buffers (default 0 / 1) normalise :meth:`score`, e.g. to give the reward model zero
    mean and unit variance on reference samples as in Ziegler et al. (2019), Sec. 2.2.

    Passing a model with a task head (e.g. ``GPT2LMHeadModel``) keeps only its base model.
    Saved as a transformers ``*ForSequenceClassification`` folder (:meth:`save_pretrained`).
    """

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = backbone.base_model
        self.hidden_size = _hidden_size(self.backbone.config)
        self.head = nn.Linear(self.hidden_size, 1)
        # std 1/sqrt(H + 1) keeps the initial output at unit scale for unit-scale features
        # (the reward-head initialisation of Ziegler et al., 2019). Uses torch's global RNG.
        nn.init.normal_(self.head.weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        reference = next(self.backbone.parameters())
        self.head.to(device=reference.device, dtype=reference.dtype)

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids and mask -> (B, T) raw scalar at every position."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state.to(self.head.weight.dtype)  # (B, T, H)
        return self.head(hidden).squeeze(-1)

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) -> (B,) normalised scalar at each row's last real token (any padding side)."""
        index = last_token_index(attention_mask)
        # A supported backbone runs only what the last token needs (alignkit.models.lean).
        hidden = (
            last_token_hidden(self.backbone, input_ids, attention_mask, index)
            if self._lean_allowed()
            else None
        )
        if hidden is not None:
            raw = self._raw(hidden)
        else:
            raw = self(input_ids, attention_mask).gather(1, index.unsqueeze(-1)).squeeze(1)
        return (raw - self.mean) / self.std

    def _lean_allowed(self) -> bool:
        """False when a hook on this module (e.g. FSDP's) expects its forward to run."""
        return not (self._forward_hooks or self._forward_pre_hooks)

    def _raw(self, hidden: Tensor) -> Tensor:
        """(..., H) final hidden states -> (...) raw head outputs, in the head's precision."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def values_packed(self, packed: PackedSequences, read: Tensor) -> Tensor | None:
        """Raw per-token scalars (as :meth:`forward`) at the packed tokens ``read`` (...).

        None where the backbone has no lean path (see :meth:`score_packed`); ``read`` holds
        flat token indices, N (one past the last) for positions the caller masks out.
        """
        hidden = packed_states(self.backbone, packed, read) if self._lean_allowed() else None
        return None if hidden is None else self._raw(hidden)

    def score_packed(self, packed: PackedSequences) -> Tensor | None:
        """(M,) normalised scalars at each packed row's last token (:mod:`alignkit.models.packing`).

        None where the backbone has no lean path (an unsupported model, or a hook on this model
        or its backbone); the caller then scores ``packed.padded(...)`` with :meth:`score`.
        """
        hidden = packed_last_hidden(self.backbone, packed) if self._lean_allowed() else None
        return None if hidden is None else (self._raw(hidden) - self.mean) / self.std

    # ------------------------------------------------------------------ HF sequence classification

    def _classification_config(self, tokenizer: PreTrainedTokenizerBase | None) -> PretrainedConfig:
        """A copy of the backbone's config with one label and the pad token HF reads by."""
        config = copy.deepcopy(self.backbone.config)
        for key in (REWARD_OFFSET_KEY, NORMALIZATION_KEY):
            if hasattr(config, key):
                delattr(config, key)
        config.architectures = None
        config.num_labels = 1
        # A scalar output: HF's own reading of one label (MSE loss), and the text-classification
        # pipeline then returns the raw logit instead of a sigmoid of it.
        config.problem_type = "regression"
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        pad = pad if pad is not None else config.get_text_config().pad_token_id
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        if pad is None:
            warnings.warn(
                "no pad token id: the HF model reads the last position of every row, so it "
                "scores unpadded single sequences only",
                stacklevel=3,
            )
        elif pad == eos:
            warnings.warn(
                f"pad token id equals eos ({eos}): the HF model reads the last non-pad token, "
                "the one before the EOS where alignkit reads",
                stacklevel=3,
            )
        config.pad_token_id = pad
        config.get_text_config().pad_token_id = pad
        return config

    def to_sequence_classification(
        self, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> PreTrainedModel:
        """This model as a transformers ``*ForSequenceClassification`` model (shares weights).

        The class comes from the auto mapping of the backbone's model type; it is built on the
        meta device and its base model (the submodule named by ``base_model_prefix``) is this
        model's backbone, so no weight is copied and the state-dict keys are the class's own.
        Normalisation is folded into the head (:func:`fold_normalization`): the HF logits plus
        ``config.reward_offset`` equal :meth:`score`, and the logits alone equal it when the
        class's head has a bias.

        Args:
            tokenizer: gives ``pad_token_id``, which the HF model uses to find each row's last
                real token; without it the backbone config's pad token is used.

        Raises:
            ModelLoadError: the architecture has no sequence-classification class, its base
                model's keys differ from the backbone's, or its head is not ``Linear(H, 1)``.
        """
        config = self._classification_config(tokenizer)
        sequence_classification_class(config)  # a clear error before anything is built
        with torch.device("meta"):
            seq = AutoModelForSequenceClassification.from_config(config)
        prefix = seq.base_model_prefix
        _, head = _head_linear(seq)
        expected = set(seq.state_dict())
        if not isinstance(self.backbone, type(getattr(seq, prefix))):
            raise ModelLoadError(
                f"{type(seq).__name__}.{prefix} is a {type(getattr(seq, prefix)).__name__}, "
                f"not the backbone's {type(self.backbone).__name__}"
            )
        setattr(seq, prefix, self.backbone)
        weight, bias, offset = fold_normalization(
            self.head.weight,
            self.head.bias,
            float(self.mean),
            float(self.std),
            head_bias=head.bias is not None,
        )
        head_state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        head.load_state_dict(head_state, assign=True)
        got = set(seq.state_dict())
        if got != expected:
            raise ModelLoadError(
                f"backbone keys do not match {type(seq).__name__}: missing "
                f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
            )
        setattr(seq.config, REWARD_OFFSET_KEY, offset)
        setattr(seq.config, NORMALIZATION_KEY, {"mean": float(self.mean), "std": float(self.std)})
        # The backbone is shared: its train / eval mode stays as it is, and the rest follows.
        seq.training = self.backbone.training
        for child in seq.children():
            if child is not self.backbone:
                child.train(self.backbone.training)
        return seq

    def save_pretrained(
        self,
        out_dir: str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Path:
        """Write an HF ``*ForSequenceClassification`` folder (safetensors) atomically.

        ``AutoModelForSequenceClassification.from_pretrained(out_dir)`` loads it with no missing
        or unexpected keys (:meth:`to_sequence_classification`). ``config.json`` carries
        ``reward_offset`` (``logits + reward_offset`` is :meth:`score`) and
        ``alignkit_normalization`` (mean / std, so :meth:`from_pretrained` restores the raw head
        and normalisation as trained). The tokenizer, when given, is saved alongside.
        """
        out_dir = Path(out_dir).expanduser()
        seq = self.to_sequence_classification(tokenizer)
        with atomic_directory(out_dir) as tmp:
            seq.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return out_dir

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        trust_remote_code: bool = False,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
    ) -> ScalarHeadModel:
        """Load a saved scalar-head model, or seed one from any backbone folder / Hub id.

        Three layouts are read:

        * a ``*ForSequenceClassification`` folder with one label (what :meth:`save_pretrained`
          writes, or any HF tool): the head is unfolded by :func:`unfold_normalization`;
        * the legacy layout: backbone + ``scalar_head.safetensors`` + ``scalar_head.json``;
        * anything else (e.g. a causal-LM checkpoint): ``AutoModel`` loads the backbone,
          ignoring any LM-head weights, and the head is freshly initialised.

        The result is in eval mode with dropout disabled, like :func:`load_causal_lm`.
        """
        source = _resolve_source(path)
        folder = Path(source)
        legacy = (folder / HEAD_WEIGHTS_NAME).is_file()
        kwargs = _hub_kwargs(trust_remote_code)
        try:
            config = None if legacy else AutoConfig.from_pretrained(source, **kwargs)
            if config is not None and any(
                a.endswith(_SEQ_CLS_SUFFIX) for a in config.architectures or ()
            ):
                model = cls._from_sequence_classification(source, config, dtype, kwargs)
            else:
                backbone = AutoModel.from_pretrained(source, dtype=_resolve_dtype(dtype), **kwargs)
                model = cls(backbone)
        except ModelLoadError:
            raise
        except (OSError, ValueError, SafetensorError) as exc:
            raise _load_error(path, source, exc) from exc
        if legacy:
            try:
                head = load_file(folder / HEAD_WEIGHTS_NAME)
            except SafetensorError as exc:
                raise _load_error(path, source, exc) from exc
            model.head.load_state_dict(head)
            if (folder / HEAD_CONFIG_NAME).is_file():
                head_config = json.loads((folder / HEAD_CONFIG_NAME).read_text())
                model.mean.fill_(float(head_config.get("mean", 0.0)))
                model.std.fill_(float(head_config.get("std", 1.0)))
        model.to(device)
        disable_dropout(model)
        model.eval()
        return model

    @classmethod
    def _from_sequence_classification(
        cls,
        source: str,
        config: PretrainedConfig,
        dtype: str | torch.dtype,
        kwargs: dict[str, Any],
    ) -> ScalarHeadModel:
        """A model from a ``*ForSequenceClassification`` folder (see :meth:`from_pretrained`)."""
        if config.num_labels != 1:
            raise ModelLoadError(
                f"{source}: a sequence classifier with {config.num_labels} labels is not a "
                "scalar (reward / value) model"
            )
        seq, info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=_resolve_dtype(dtype), output_loading_info=True, **kwargs
        )
        if info.get("missing_keys"):
            # transformers would fill them with a random init, silently changing every score.
            raise ModelLoadError(
                f"{source}: weights missing from the folder: {sorted(info['missing_keys'])[:5]}"
            )
        _, head = _head_linear(seq)
        offset = float(getattr(config, REWARD_OFFSET_KEY, 0.0) or 0.0)
        normalization = getattr(config, NORMALIZATION_KEY, None)
        weight, bias, mean, std = unfold_normalization(
            head.weight,
            head.bias,
            offset,
            normalization if isinstance(normalization, dict) else None,
        )
        model = cls(seq)  # keeps seq's base model; its head is replaced below
        with torch.no_grad():
            model.head.weight.copy_(weight)
            model.head.bias.copy_(bias)
            model.mean.fill_(mean)
            model.std.fill_(std)
        # Absorbed into head and buffers; a stale copy on the live config would mislead.
        for key in (REWARD_OFFSET_KEY, NORMALIZATION_KEY):
            if hasattr(model.config, key):
                delattr(model.config, key)
        return model
