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
from alignkit.data.chat import Conversation, PromptFormat
from alignkit.data.demonstrations import read_demonstrations
from alignkit.data.prompts import conversation, prompt_format
from alignkit.errors import ConfigError, DataError
from alignkit.evaluation import gold_scores, sample_policy
from alignkit.progress import progress_bar
from alignkit.rewards.learned import model_max_length
from alignkit.rl.optim import adamw
from alignkit.stages.common import base_model_path, linear_warmup_decay, load_model
from alignkit.tracking import console


def demonstration_pairs(ctx: RunContext, fmt: PromptFormat) -> list[tuple[Conversation, str]]:
    """(prompt, response text) pairs: the prompt as a conversation, or verbatim text.

    From the task's own examples (``task=data``), else ``task.sft_data`` (standard formats, or
    ``{"prompt": ..., "response": ...}`` lines whose prompt is the verbatim text the model
    sees), else the task's synthetic demonstrations.
    """
    task = ctx.task
    if hasattr(task, "examples"):
        return [(conversation(task, e.prompt, fmt.raw_text), e.completion) for e in task.examples()]
    if ctx.cfg.task.sft_data:
        return read_demonstrations(str(ctx.cfg.task.sft_data), fmt)
    demos = task.demonstrations(int(ctx.cfg.task.demonstrations), seed=int(ctx.cfg.seed))
    return [(conversation(task, d.prompt, fmt.raw_text), d.response) for d in demos]


def encode_pairs(
    fmt: PromptFormat, pairs: list[tuple[Conversation, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response (closed by EOS or the template's end-of-turn token) and
    the index where the response starts: the loss is on the assistant's reply only.

    A pair longer than ``max_length`` loses the end of its response, never its prompt; a
    prompt that alone leaves no room for a response token is refused with its index.
    """
    encoded = []
    for i, (prompt, response) in enumerate(pairs):
        p, r = fmt.encode(prompt, response)
        if len(p) >= max_length:
            raise DataError(
                f"demonstration {i + 1}: its prompt has {len(p)} tokens, which leaves no room "
                f"for the response within {max_length} (sft.max_length or the model's context)"
            )
        ids = (p + r)[:max_length]
        encoded.append((ids, len(p)))
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
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Token-mean NLL of the labelled tokens: logits at t predict token t+1.

    ``num_tokens`` replaces this batch's labelled-token count as the normaliser: under
    data parallelism it is the global count, so that the ranks' losses add up to the global
    token mean.
    """
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    if num_tokens is None:
        return torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    total = torch.nn.functional.cross_entropy(
        flat_logits, flat_labels, ignore_index=-100, reduction="sum"
    )
    return total / max(num_tokens, 1.0)


def distributed_sft_loss(
    ctx: RunContext,
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """(loss to back-propagate, global token-mean loss) of this rank's share of a batch.

    FSDP averages gradients over W ranks, so each rank's loss is its summed NLL divided by
    the global token count N and multiplied by W: the averaged gradient is that of the
    global token mean ``sum_ranks NLL_r / N``, exactly as in one process.
    """
    backend = ctx.backend
    local = (labels[:, 1:] != -100).sum().to(torch.float64)
    num_tokens = float(backend.all_reduce(local.to(backend.device), "sum").item())
    loss = sft_loss(model, ids, mask, labels, num_tokens=num_tokens)
    value = backend.all_reduce(loss.detach().clone(), "sum").item()
    return loss * backend.world_size, value


def sft_max_length(ctx: RunContext, model: Any) -> int:
    """``sft.max_length``, else the model's context size (its position table)."""
    if ctx.cfg.sft.get("max_length"):
        return int(ctx.cfg.sft.max_length)
    return model_max_length(model)


def gold_eval(
    ctx: RunContext, model: torch.nn.Module, tokenizer: Any
) -> tuple[float | None, list[str]]:
    """Mean gold score of sampled responses on held-out prompts (seeded); None without an
    oracle."""
    if not hasattr(ctx.task, "gold_score"):
        return None, []
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
        fmt=prompt_format(ctx.cfg, tokenizer, model),
    )
    scores = gold_scores(ctx.task, records, samples.responses)
    return sum(scores) / len(scores), samples.responses


def run_sft(ctx: RunContext) -> dict[str, float]:
    """Train, evaluate before/after with the gold oracle, save ``<run_dir>/sft``."""
    cfg = ctx.cfg.sft
    backend = ctx.backend
    model, tokenizer = load_model(ctx, base_model_path(ctx))
    fmt = prompt_format(ctx.cfg, tokenizer, model)
    pairs = demonstration_pairs(ctx, fmt)
    data = encode_pairs(fmt, pairs, max_length=sft_max_length(ctx, model))
    gold_before, _ = gold_eval(ctx, model, tokenizer)
    if backend.distributed and int(cfg.batch_size) % backend.world_size:
        raise ConfigError(
            f"sft.batch_size={cfg.batch_size} must be a multiple of the number of ranks "
            f"({backend.world_size})"
        )
    # Placed and (under FSDP) sharded before the optimizer sees the parameters.
    model = backend.prepare_model(model)

    optimizer = adamw(model.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    steps = int(cfg.steps)
    scheduler = linear_warmup_decay(optimizer, int(cfg.warmup_steps), steps)
    rng = random.Random(int(ctx.cfg.seed))
    order: list[int] = []
    loss_value = float("nan")
    model.train()
    with progress_bar() as progress:
        bar = progress.add_task("sft", total=steps, info="")
        for step in range(steps):
            if len(order) < int(cfg.batch_size):
                fresh = list(range(len(data)))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[: int(cfg.batch_size)], order[int(cfg.batch_size) :]
            # Every rank draws the same batch and trains on its contiguous share of it.
            ids, mask, labels = collate(
                [data[i] for i in backend.shard(idx)], tokenizer.pad_token_id
            )
            ids, mask, labels = ids.to(ctx.device), mask.to(ctx.device), labels.to(ctx.device)
            with backend.autocast():
                if backend.distributed:
                    loss, loss_value = distributed_sft_loss(ctx, model, ids, mask, labels)
                else:
                    loss = sft_loss(model, ids, mask, labels)
                    loss_value = loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
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
    # Under FSDP the shards are gathered into a plain model on rank 0 (None elsewhere).
    plain = backend.unwrap(model)
    out = ctx.run_dir / "sft"
    if plain is not None:
        save_policy(ctx, plain, tokenizer, out)
    backend.barrier()
    console.print(f"SFT policy saved to {out}")
    summary = {"sft_loss": loss_value, "sft_examples": float(len(data))}
    if gold_before is not None and gold_after is not None:
        summary |= {"gold_score_base": gold_before, "gold_score_sft": gold_after}
    return summary


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
