"""``alignkit export SRC OUT [--kind auto|policy|reward|critic]``: a plain Hugging Face folder.

What each kind reads, and the Auto class its output loads with:

* ``policy`` -> ``AutoModelForCausalLM``: an RL checkpoint (a ``step_*`` directory, or a
  ``checkpoints/`` directory whose ``latest`` names one) holding ``model.safetensors`` (one
  device) or the sharded ``dcp/`` (FSDP; read in one process, DCP reshards on load), with
  LoRA adapters merged when the run used them; a peft adapter folder (merged); or a causal-LM
  folder (re-saved).
* ``reward`` -> ``AutoModelForSequenceClassification``: a reward-model folder in the legacy
  layout (``scalar_head.safetensors``) or the current one, or an ensemble (each ``member_<i>``
  exported into the same name under OUT).
* ``critic`` -> ``AutoModelForSequenceClassification``: the learned critic of an RL
  checkpoint (an algorithm with a critic writes it to the checkpoint subfolder
  ``value_model/``; SRC may be the checkpoint or that subfolder). A value head shared with
  the policy is exported on the policy's backbone.

``auto`` (the default) picks: an RL checkpoint -> policy; a checkpoint's critic subfolder ->
critic; a scalar-head folder or ensemble -> reward; a peft adapter or causal-LM folder ->
policy. Scalar models are written by :meth:`alignkit.models.ScalarHeadModel.save_pretrained`
(HF logits + ``config.reward_offset`` = alignkit's score; see ``docs/export.md``).

The architecture and tokenizer come from the checkpoint's ``model_config/`` folder (``hf/``
in checkpoints written before the rename). Every output is written atomically, weights as
safetensors. FSDP metadata is read without unpickling code (:mod:`alignkit.backends.safe_dcp`).

Usage::

    alignkit export outputs/.../rl/checkpoints/step_000050 exported/
    alignkit export outputs/.../rl/checkpoints exported/     # the checkpoint named by `latest`
    alignkit export outputs/.../rl/checkpoints critic/ --kind critic
    alignkit export outputs/.../reward_model reward_hf/
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit.backends.fsdp import DCP_DIR
from alignkit.engine.checkpoint import (
    LATEST,
    LEGACY_HF_DIR,
    LORA_DIR,
    MODEL_CONFIG_DIR,
    model_config_dir,
)
from alignkit.errors import AlignkitError, ConfigError
from alignkit.io import atomic_directory
from alignkit.models import ScalarHeadModel, is_scalar_head_folder

__all__ = [
    "KINDS",
    "detect_kind",
    "export",
    "export_checkpoint",
    "export_critic",
    "export_policy",
    "export_reward_model",
    "load_checkpoint_critic",
    "load_checkpoint_model",
    "main",
    "resolve_checkpoint",
]

KINDS: tuple[str, ...] = ("auto", "policy", "reward", "critic")
WEIGHTS_NAME = "model.safetensors"
_NOT_CRITIC_DIRS = frozenset({MODEL_CONFIG_DIR, LEGACY_HF_DIR, DCP_DIR})


# --------------------------------------------------------------------------------------------
# locating things
# --------------------------------------------------------------------------------------------


def _is_checkpoint(path: Path) -> bool:
    return (path / LATEST).is_file() or (path / "state.json").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the one a ``checkpoints/latest`` pointer names."""
    path = Path(path).expanduser()
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "state.json").is_file():
        raise ConfigError(f"{path} is not a complete alignkit checkpoint (no state.json)")
    return path


def _config_dir(checkpoint: Path) -> Path:
    found = model_config_dir(checkpoint)
    if found is None:
        raise ConfigError(
            f"{checkpoint} has no {MODEL_CONFIG_DIR}/config.json: it predates export support "
            "or holds LoRA adapters of an older version; use the run's rl/policy folder instead"
        )
    return found


def _has_weights(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file() or (folder / DCP_DIR).is_dir()


def _critic_folders(checkpoint: Path) -> list[Path]:
    """Subfolders of a checkpoint that hold a module's weights (a critic: ``value_model/``)."""
    return [
        d
        for d in sorted(checkpoint.iterdir())
        if d.is_dir()
        and not d.name.startswith(".")
        and d.name not in _NOT_CRITIC_DIRS
        and _has_weights(d)
    ]


def _resolve_critic(path: Path) -> tuple[Path, Path]:
    """(checkpoint, critic folder) for a checkpoint or a checkpoint's critic subfolder."""
    if not _is_checkpoint(path) and (path.parent / "state.json").is_file() and _has_weights(path):
        return path.parent, path
    checkpoint = resolve_checkpoint(path)
    found = _critic_folders(checkpoint)
    if not found:
        raise ConfigError(
            f"{checkpoint} holds no critic (a subfolder with weights, such as the value_model/ "
            "that an algorithm with a critic writes)"
        )
    if len(found) > 1:
        names = ", ".join(d.name for d in found)
        raise ConfigError(f"{checkpoint} holds several modules ({names}); pass one of them as SRC")
    return checkpoint, found[0]


def _member_folders(path: Path) -> list[Path]:
    """The ``member_<i>`` scalar-head folders of a reward-model ensemble, by ``i``."""
    members = [
        p
        for p in path.glob("member_*")
        if p.name.removeprefix("member_").isdigit() and is_scalar_head_folder(p)
    ]
    return sorted(members, key=lambda p: int(p.name.removeprefix("member_")))


def detect_kind(src: str | Path) -> str:
    """``policy``, ``reward`` or ``critic`` for ``src`` (see the module docstring)."""
    path = Path(src).expanduser()
    if _is_checkpoint(path):
        return "policy"
    if (path.parent / "state.json").is_file() and _has_weights(path):
        return "critic"
    if is_scalar_head_folder(path) or _member_folders(path):
        return "reward"
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return "policy"
    raise ConfigError(
        f"{path} is not a complete alignkit checkpoint (no state.json), a reward-model or "
        "critic folder, or an HF model folder"
    )


# --------------------------------------------------------------------------------------------
# loading weights
# --------------------------------------------------------------------------------------------


def _load_weights(module: torch.nn.Module, folder: Path, hint: str = "") -> None:
    """Fill ``module`` from ``folder``'s ``model.safetensors`` or ``dcp/``, strictly."""
    try:
        if (folder / DCP_DIR).is_dir():
            from alignkit.backends.safe_dcp import load_dcp_tensors

            state = {"model": module.state_dict()}
            # Without a process group DCP reads every shard into these full tensors in place.
            load_dcp_tensors(state, folder / DCP_DIR)
            module.load_state_dict(state["model"])
        elif (folder / WEIGHTS_NAME).is_file():
            from safetensors.torch import load_model

            load_model(module, str(folder / WEIGHTS_NAME))
        else:
            raise ConfigError(f"{folder} holds neither {WEIGHTS_NAME} nor {DCP_DIR}/")
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"weights in {folder} do not fit the model{hint}: {exc}") from exc


def _stored_keys(folder: Path) -> set[str]:
    """Names of the tensors stored in ``folder`` (``model.`` prefix of DCP removed)."""
    if (folder / DCP_DIR).is_dir():
        from alignkit.backends.safe_dcp import read_dcp_metadata

        stored = read_dcp_metadata(folder / DCP_DIR).state_dict_metadata
        return {k.removeprefix("model.") for k in stored if k.startswith("model.")}
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return set(f.keys())


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ConfigError(
            "exporting a LoRA policy needs the optional 'peft' package to merge its adapters: "
            "install the 'lora' extra (pip install 'alignkit[lora]')"
        ) from exc
    return peft


def load_checkpoint_model(path: str | Path) -> torch.nn.Module:
    """The policy of a checkpoint as a plain (unsharded) causal LM on the CPU, in eval mode.

    A LoRA checkpoint (``model_config/lora/``) is rebuilt with its adapters and merged.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_checkpoint(path)
    config_dir = _config_dir(path)
    config = AutoConfig.from_pretrained(config_dir)
    lora = config_dir / LORA_DIR
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten; keep the RNG
        model = AutoModelForCausalLM.from_config(config)
        if (lora / "adapter_config.json").is_file():
            peft = _peft()
            with warnings.catch_warnings():
                # The adapters were trained on this architecture, loaded from another path.
                warnings.filterwarnings("ignore", message=".*base_model_name_or_path")
                model = peft.get_peft_model(model, peft.LoraConfig.from_pretrained(str(lora)))
    _load_weights(model, path)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def load_checkpoint_critic(
    path: str | Path, config_dir: str | Path | None = None
) -> ScalarHeadModel:
    """The critic of a checkpoint (or of its critic subfolder) as a :class:`ScalarHeadModel`.

    A separate critic's architecture is read from, in order: ``config_dir``, the critic
    folder's own ``model_config/``, the checkpoint's (the policy's, which a critic copied
    from the policy shares). A shared value head (weights ``weight`` / ``bias`` only) sits
    on the checkpoint's policy backbone.
    """
    from transformers import AutoConfig, AutoModel

    checkpoint, folder = _resolve_critic(Path(path).expanduser())
    if _stored_keys(folder) == {"weight", "bias"}:
        model = ScalarHeadModel(load_checkpoint_model(checkpoint))
        _load_weights(model.head, folder)
        return model.eval()
    if config_dir is None:
        own = folder / MODEL_CONFIG_DIR
        config_dir = own if (own / "config.json").is_file() else _config_dir(checkpoint)
    config = AutoConfig.from_pretrained(config_dir)
    with torch.random.fork_rng(devices=[]):
        model = ScalarHeadModel(AutoModel.from_config(config))
    _load_weights(
        model,
        folder,
        hint=f" of {config_dir}; if the critic started from another model, pass its folder "
        "(algorithm.value_model_path) with --critic-config",
    )
    return model.eval()


def _tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``, or None when it holds none."""
    if not any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# exporting
# --------------------------------------------------------------------------------------------


def _save_causal_lm(model: torch.nn.Module, tokenizer: Any, out: str | Path) -> Path:
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out).expanduser()


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's policy and tokenizer to ``out`` (safetensors, atomically)."""
    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint_model(path)
    return _save_causal_lm(model, _tokenizer(_config_dir(path)), out)


def export_policy(src: str | Path, out: str | Path) -> Path:
    """A policy as an ``AutoModelForCausalLM`` folder: RL checkpoint, peft adapters, HF folder."""
    path = Path(src).expanduser()
    if _is_checkpoint(path):
        return export_checkpoint(path, out)
    if (path / "adapter_config.json").is_file():
        peft = _peft()
        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload()
        tokenizer = _tokenizer(path)
        if tokenizer is None:
            base = json.loads((path / "adapter_config.json").read_text())
            base_path = Path(str(base.get("base_model_name_or_path", "")))
            tokenizer = _tokenizer(base_path) if base_path.is_dir() else None
        return _save_causal_lm(model.eval(), tokenizer, out)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a causal-LM folder: {exc}") from exc
    return _save_causal_lm(model.eval(), _tokenizer(path), out)


def export_reward_model(src: str | Path, out: str | Path) -> Path:
    """A reward-model folder (either layout, or an ensemble) as sequence-classification folders."""
    path = Path(src).expanduser()
    members = _member_folders(path)
    if members and not is_scalar_head_folder(path):
        with atomic_directory(out) as tmp:
            for member in members:
                model = ScalarHeadModel.from_pretrained(member)
                model.save_pretrained(tmp / member.name, _tokenizer(member))
        return Path(out).expanduser()
    if not is_scalar_head_folder(path):
        raise ConfigError(
            f"{path} is not a trained reward model (neither a sequence-classification folder "
            "nor backbone + scalar_head.safetensors)"
        )
    return ScalarHeadModel.from_pretrained(path).save_pretrained(out, _tokenizer(path))


def export_critic(
    src: str | Path, out: str | Path, *, critic_config: str | Path | None = None
) -> Path:
    """An RL checkpoint's critic as a sequence-classification folder (with the policy's
    tokenizer, whose ids the critic reads)."""
    checkpoint, _ = _resolve_critic(Path(src).expanduser())
    model = load_checkpoint_critic(src, critic_config)
    return model.save_pretrained(out, _tokenizer(_config_dir(checkpoint)))


def export(
    src: str | Path, out: str | Path, kind: str = "auto", *, critic_config: str | Path | None = None
) -> tuple[str, Path]:
    """Export ``src`` as ``kind`` (``auto``: :func:`detect_kind`); returns (kind, out)."""
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = detect_kind(src)
    if kind == "policy":
        return kind, export_policy(src, out)
    if kind == "reward":
        return kind, export_reward_model(src, out)
    return kind, export_critic(src, out, critic_config=critic_config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alignkit export",
        description="Export a policy, reward model or critic to a plain HF folder.",
    )
    parser.add_argument(
        "src", help="a step_* or checkpoints/ directory, a reward-model folder, or a critic"
    )
    parser.add_argument("out", help="the HF folder to write")
    parser.add_argument("--kind", choices=KINDS, default="auto", help="what SRC holds")
    parser.add_argument(
        "--critic-config",
        default=None,
        help="folder with the critic's architecture when it did not start from the policy",
    )
    args = parser.parse_args(argv)
    try:
        kind, out = export(args.src, args.out, args.kind, critic_config=args.critic_config)
    except AlignkitError as exc:
        print(f"alignkit: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {kind} {args.src} to {out}")
    return 0
