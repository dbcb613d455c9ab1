"""Config schema of the critique reward (``reward.critique``) and the judge it builds.

Everything about the judge lives under ``reward.critique``: the reward plugin, the RLAIF
annotator (``feedback.annotator=rlaif``), ``stage=judge`` (``reward.critique.build``) and
``stage=critique_revision`` (``reward.critique.revision``) read the same node, so one judge
configuration serves all of them. ``conf/judge/*.yaml`` hold ready-made judge nodes
(``+judge=http``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignkit.config import RewardConfig
from alignkit.errors import ConfigError
from alignkit.judges.critic import CritiqueJudge
from alignkit.judges.http import DEFAULT_DEADLINE_S
from alignkit.judges.templates import load_template, parse_principles

__all__ = [
    "BACKENDS",
    "CritiqueRewardConfig",
    "JudgeBuildConfig",
    "JudgeConfig",
    "RevisionConfig",
    "build_backend",
    "build_critique_judge",
    "critique_config",
]

BACKENDS = ("local", "http")
MODES = ("pointwise", "pairwise")


@dataclass
class PrincipleConfig:
    name: str = MISSING
    text: str = MISSING
    weight: float = 1.0


@dataclass
class JudgeConfig:
    """The judge model: a local causal LM or an OpenAI-compatible endpoint."""

    backend: str = "local"
    """local (a transformers causal LM from ``path``) | http (``url``)."""
    template: str = "assist"
    """``conf/prompts/<name>.yaml`` or a path to a template file."""
    max_critique_tokens: int = 40
    """Generation budget for the critique and the verdict."""
    # local
    path: str | None = None
    """local: HF folder or hub name (``stage=judge`` writes ``<run_dir>/judge``)."""
    dtype: str = "float32"
    trust_remote_code: bool = False
    batch_size: int = 64
    """local: contexts per generation batch."""
    max_length: int | None = None
    """local: context tokens kept; null: the model's limit minus the generation budget."""
    # http
    url: str | None = None
    """http: base URL with the version prefix, e.g. ``http://127.0.0.1:8000/v1``."""
    endpoint: str = "completions"
    """http: completions (``/v1/completions``) | chat (``/v1/chat/completions``)."""
    model: str = "judge"
    """http: the ``model`` field of the requests."""
    api_key_env: str | None = None
    """http: NAME of the environment variable holding the API key (never the key)."""
    max_concurrency: int = 8
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    """First retry delay; doubles with each retry, times a random factor in [0.5, 1.5). A 429
    or 503 answer's ``Retry-After`` (seconds or HTTP date) is waited instead."""
    deadline_s: float | None = DEFAULT_DEADLINE_S
    """Seconds one request may take with all its retries and waits (null: no limit). Once a
    request gave up on a hung server, the rest of the step's batch stops retrying, so a hung
    judge fails a step in about this long (the former worst case, 30 s x 4 attempts per wave
    of requests, was minutes)."""
    top_logprobs: int = 5
    """Alternatives per token requested for the verdict (0: parse the verdict from text)."""


@dataclass
class JudgeBuildConfig:
    """``stage=judge``: fine-tune a tiny judge on synthetic critiques of the built-in task."""

    examples: int = 16000
    """Synthetic (context, critique, verdict) examples."""
    pairwise_fraction: float = 0.12
    revision_fraction: float = 0.08
    steps: int = 2000
    """2000: at 1000 the judge's per-principle rank correlation with gold on held-out prompts
    was 0.59, at 2000 0.65 (docs/critique.md); each step is about 0.2 s on one thread."""
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    vocab_size: int = 1024
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 160
    eval_prompts: int | None = None
    """Held-out prompts for the rank correlation (null: the whole eval split)."""
    out: str | None = None
    """Output folder; null: ``<run_dir>/judge``."""
    log_every: int = 25


@dataclass
class RevisionConfig:
    """``stage=critique_revision``: critique and revise policy samples (Constitutional AI)."""

    policy: str | None = None
    """Policy folder to sample from; null: ``feedback.policy``, ``model.path``, else
    ``<run_dir>/sft``."""
    num_prompts: int | None = 200
    """Prompts of the split (a seeded subset; null: all)."""
    samples_per_prompt: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 32
    max_revision_tokens: int = 32
    split: str = "train"
    seed: int = 0
    keep_unchanged: bool = False
    """Also write demonstrations whose revision equals the original response."""


@dataclass
class CritiqueRewardConfig(RewardConfig):
    """``reward=critique``: the judge's verdict probability as a reward component."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    principles: list[PrincipleConfig] | None = None
    """The principles (name, text, weight); null: the template's."""
    per_principle: bool = True
    """One critique and verdict per principle, combined with the weights; false: one critique
    against all principles."""
    mode: str = "pointwise"
    """pointwise (a score per response) | pairwise (mean win probability against the other
    samples of the same prompt, for group-based methods)."""
    both_orders: bool = True
    """pairwise: judge (a, b) and (b, a) and average, cancelling position bias."""
    on_error: str = "raise"
    """raise | fallback (a failed judgement scores ``fallback_value``)."""
    fallback_value: float | None = None
    score_scale: float | None = None
    """Denominator of a bare parsed number (e.g. 10 for "Score: 7"); null: only x/y forms."""
    log_every: int = 10
    """RL steps between critique tables (0: never)."""
    log_samples: int = 8
    """Critiques per table."""
    build: JudgeBuildConfig = field(default_factory=JudgeBuildConfig)
    revision: RevisionConfig = field(default_factory=RevisionConfig)


def critique_config(cfg: Any) -> Any:
    """``reward.critique`` checked against :class:`CritiqueRewardConfig` (defaults if absent).

    The node is typed when ``reward=[critique]`` selected it; merged here too so that stages
    that read it without the reward selected still get the schema's defaults and key checks.
    """
    node = (cfg.get("reward") or {}).get("critique")
    base = OmegaConf.structured(CritiqueRewardConfig)
    try:
        return OmegaConf.merge(base, node) if node is not None else base
    except OmegaConfBaseException as exc:
        raise ConfigError(f"reward.critique: {exc}") from None


def _optional_float(node: Any, key: str, default: float | None) -> float | None:
    """``node.key`` as a float (None stays None), or ``default`` when the node lacks the key."""
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return None if value is None else float(value)


def build_backend(judge: Any, device: str | torch.device = "cpu", system: str = "") -> Any:
    """The backend named by ``judge.backend``."""
    name = str(judge.backend)
    if name == "local":
        if not judge.path:
            raise ConfigError(
                "reward.critique.judge.path is not set: the judge model folder "
                "(alignkit stage=judge writes <run_dir>/judge), or use judge.backend=http"
            )
        from alignkit.judges.local import LocalJudge

        return LocalJudge(
            str(judge.path),
            device=device,
            dtype=str(judge.dtype),
            trust_remote_code=bool(judge.trust_remote_code),
            batch_size=int(judge.batch_size),
            max_critique_tokens=int(judge.max_critique_tokens),
            max_length=judge.max_length,
        )
    if name == "http":
        from alignkit.judges.http import HTTPJudge

        return HTTPJudge(
            str(judge.url or ""),
            endpoint=str(judge.endpoint),
            model=str(judge.model),
            api_key_env=judge.api_key_env,
            max_concurrency=int(judge.max_concurrency),
            timeout_s=float(judge.timeout_s),
            max_retries=int(judge.max_retries),
            backoff_s=float(judge.backoff_s),
            # eval.judge's schema may predate the key: fall back to the default.
            deadline_s=_optional_float(judge, "deadline_s", DEFAULT_DEADLINE_S),
            max_critique_tokens=int(judge.max_critique_tokens),
            top_logprobs=int(judge.top_logprobs),
            system=system,
        )
    raise ConfigError(
        f"reward.critique.judge.backend={name!r}; expected one of {', '.join(BACKENDS)}"
    )


def build_critique_judge(node: Any, device: str | torch.device = "cpu") -> CritiqueJudge:
    """A :class:`CritiqueJudge` from a ``reward.critique`` node."""
    if str(node.mode) not in MODES:
        raise ConfigError(f"reward.critique.mode={node.mode!r}; expected one of {', '.join(MODES)}")
    template = load_template(str(node.judge.template))
    principles = None
    if node.principles:
        principles = parse_principles(
            OmegaConf.to_container(node.principles, resolve=True), "reward.critique.principles"
        )
    backend = build_backend(node.judge, device, system=template.system)
    return CritiqueJudge(
        backend,
        template,
        principles=principles,
        per_principle=bool(node.per_principle),
        on_error=str(node.on_error),
        fallback_value=node.fallback_value,
        score_scale=node.score_scale,
    )
