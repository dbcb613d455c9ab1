"""Pieces every stage shares: the task, the base model, seeding and the optimizer schedule."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from alignkit.context import RunContext
from alignkit.data import read_prompt_records
from alignkit.errors import ConfigError
from alignkit.models import TinyModelSpec, build_tiny_model, load_causal_lm
from alignkit.models.tiny import build_tiny_causal_lm, tiny_arch_spec


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a dedicated generator for sampling.

    The single-process case of :meth:`alignkit.backends.Backend.seed`.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def build_task(ctx: RunContext) -> Any:
    """The configured task component (``task.name``).

    A factory with ``from_config`` gets the whole ``task`` node; others get ``seed`` and
    ``max_operand``, as the built-in task does.
    """
    tcfg = ctx.cfg.task
    factory = ctx.registry.get("task", str(tcfg.name))
    if hasattr(factory, "from_config"):
        return factory.from_config(tcfg)
    return factory(seed=int(tcfg.seed), max_operand=int(tcfg.max_operand))


def train_prompts(ctx: RunContext) -> list[Any]:
    """RL prompts: the task's training split; for a task that does not read
    ``task.prompt_data`` itself (the built-in one), that file's records."""
    path = ctx.cfg.task.prompt_data
    if path and not hasattr(ctx.task, "examples"):
        return read_prompt_records(path, type(ctx.task.train_prompts()[0]))
    return ctx.task.train_prompts()


def base_model_path(ctx: RunContext) -> str:
    """``model.path``, or the task's tiny model built (once) into ``<run_dir>/base_model``."""
    if ctx.cfg.model.path:
        return str(ctx.cfg.model.path)
    out = ctx.run_dir / "base_model"
    # Under several ranks the main process builds the folder and the others then read it.
    with ctx.backend.main_process_first():
        _build_base_model(ctx, out)
    return str(out)


def _build_base_model(ctx: RunContext, out: Path) -> None:
    if (out / "config.json").is_file():
        return
    t, seed = ctx.cfg.model.tiny, int(ctx.cfg.seed)
    if str(t.get("arch", "gpt2")) != "gpt2":
        build_tiny_causal_lm(out, ctx.task.corpus(), tiny_arch_spec(t, seed))
        return
    spec = TinyModelSpec(
        vocab_size=int(t.vocab_size),
        n_layer=int(t.n_layer),
        n_head=int(t.n_head),
        n_embd=int(t.n_embd),
        n_positions=int(t.n_positions),
        seed=seed,
    )
    build_tiny_model(out, ctx.task.corpus(), spec)


def load_model(ctx: RunContext, path: str | Path) -> tuple[torch.nn.Module, Any]:
    """A causal LM and tokenizer with the configured dtype, device and remote-code policy."""
    m = ctx.cfg.model
    return load_causal_lm(
        str(path),
        dtype=str(m.dtype),
        device=ctx.device,
        trust_remote_code=bool(m.trust_remote_code),
        revision=m.revision,
    )


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 10% at ``total``."""
    if total <= 0:
        raise ConfigError(f"a stage needs at least one step, got steps={total}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.1, 1.0 - 0.9 * frac)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_threads(ctx: RunContext) -> None:
    """``backend.threads`` (the backend's ``setup`` does the same; kept for callers)."""
    threads = ctx.cfg.backend.threads
    if threads:
        torch.set_num_threads(int(threads))
