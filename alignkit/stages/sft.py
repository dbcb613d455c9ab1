"""``stage=sft``: supervised fine-tuning of the base policy on demonstrations.

The built-in task's demonstrations are deliberately of mixed quality (rambling, wrong and
unsafe answers among the ideal ones), as real demonstration data is, so the SFT policy is a
competent but imperfect starting point that RLHF then improves. The loss is the token-mean
negative log-likelihood of the response tokens (the EOS included); prompt tokens are masked.
The result is saved as an HF folder ``<run_dir>/sft`` that ``from_pretrained`` loads.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from alignkit.context import RunContext
from alignkit.data import read_sft_pairs
from alignkit.engine import _progress
from alignkit.evaluation import gold_scores, sample_policy
from alignkit.stages.common import base_model_path, linear_warmup_decay, load_model
from alignkit.tracking import console


def demonstration_pairs(ctx: RunContext) -> list[tuple[str, str]]:
    """(prompt as the model sees it, response text) pairs from a file or the task."""
    if ctx.cfg.task.sft_data:
        return read_sft_pairs(ctx.cfg.task.sft_data)
    demos = ctx.task.demonstrations(int(ctx.cfg.task.demonstrations), seed=int(ctx.cfg.seed))
    return [(ctx.task.format_prompt(d.prompt), d.response) for d in demos]


def encode_pairs(
    tokenizer: Any, pairs: list[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids of ``prompt + " " + response + EOS`` and the index where the response starts."""
    encoded = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"]
        ids = (p + r + [tokenizer.eos_token_id])[-max_length:]
        encoded.append((ids, max(0, len(ids) - len(r) - 1)))
    return encoded


def collate(
    batch: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask, and labels with -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def sft_loss(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Token-mean NLL of the labelled tokens: logits at t predict token t+1."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def gold_eval(ctx: RunContext, model: torch.nn.Module, tokenizer: Any) -> tuple[float, list[str]]:
    """Mean gold score of sampled responses on held-out prompts (seeded)."""
    records = ctx.task.eval_prompts()[: int(ctx.cfg.eval.num_prompts)]
    gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 1)
    samples = sample_policy(
        model,
        tokenizer,
        ctx.task,
        records,
        max_new_tokens=int(ctx.cfg.eval.max_new_tokens),
        temperature=float(ctx.cfg.eval.temperature),
        greedy=bool(ctx.cfg.eval.greedy),
        batch_size=int(ctx.cfg.eval.batch_size),
        max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
        generator=gen,
    )
    scores = gold_scores(ctx.task, records, samples.responses)
    return sum(scores) / len(scores), samples.responses


def run_sft(ctx: RunContext) -> dict[str, float]:
    """Train, evaluate before/after with the gold oracle, save ``<run_dir>/sft``."""
    cfg = ctx.cfg.sft
    model, tokenizer = load_model(ctx, base_model_path(ctx))
    pairs = demonstration_pairs(ctx)
    data = encode_pairs(tokenizer, pairs, max_length=int(ctx.cfg.model.tiny.n_positions))
    gold_before, _ = gold_eval(ctx, model, tokenizer)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay)
    )
    steps = int(cfg.steps)
    scheduler = linear_warmup_decay(optimizer, int(cfg.warmup_steps), steps)
    rng = random.Random(int(ctx.cfg.seed))
    order: list[int] = []
    loss_value = float("nan")
    model.train()
    with _progress() as progress:
        bar = progress.add_task("sft", total=steps, info="")
        for step in range(steps):
            if len(order) < int(cfg.batch_size):
                fresh = list(range(len(data)))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[: int(cfg.batch_size)], order[int(cfg.batch_size) :]
            ids, mask, labels = collate([data[i] for i in idx], tokenizer.pad_token_id)
            loss = sft_loss(model, ids.to(ctx.device), mask.to(ctx.device), labels.to(ctx.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            loss_value = loss.item()
            if step % int(cfg.log_every) == 0 or step == steps - 1:
                ctx.tracker.log(
                    {
                        "loss": loss_value,
                        "grad_norm": grad_norm.item(),
                        "lr": scheduler.get_last_lr()[0],
                    },
                    step=step,
                    stage="sft",
                )
            _advance(progress, bar, f"loss {loss_value:.3f}")
    model.eval()
    gold_after, _ = gold_eval(ctx, model, tokenizer)
    out = save_policy(ctx, model, tokenizer, ctx.run_dir / "sft")
    console.print(f"SFT policy saved to {out}")
    return {
        "sft_loss": loss_value,
        "gold_score_base": gold_before,
        "gold_score_sft": gold_after,
        "sft_examples": float(len(data)),
    }


def _advance(progress: Progress, bar: Any, info: str) -> None:
    progress.update(bar, advance=1, info=info)


def save_policy(ctx: RunContext, model: Any, tokenizer: Any, out: Path) -> Path:
    """Save an HF folder (safetensors weights + tokenizer) atomically; main process only."""
    from alignkit.io import atomic_write_dir

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    if ctx.is_main_process:
        atomic_write_dir(out, fill)
    return out
