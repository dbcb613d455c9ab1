"""Gold-oracle evaluation: sample a policy on held-out prompts and score it as the human would."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.generation import decode_responses, generate, tokenize_prompts
from alignkit.models import response_logprobs


@dataclass
class Samples:
    """Responses of one policy on a list of prompts, with token tensors for KL estimates."""

    records: list[Any]
    responses: list[str]
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R)


@torch.no_grad()
def sample_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    records: Sequence[Any],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    max_prompt_tokens: int = 32,
    generator: torch.Generator | None = None,
) -> Samples:
    """One response per record, generated in batches."""
    model.eval()
    chunks = []
    for start in range(0, len(records), batch_size):
        part = records[start : start + batch_size]
        texts = [task.format_prompt(r) for r in part]
        ids, mask = tokenize_prompts(tokenizer, texts, max_length=max_prompt_tokens)
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=temperature,
            greedy=greedy,
            generator=generator,
            return_logprobs=False,
        )
        chunks.append((ids, mask, out.response_ids, out.response_mask))
    responses: list[str] = []
    for _, _, rids, rmask in chunks:
        responses += decode_responses(tokenizer, rids, rmask)
    pad = int(tokenizer.pad_token_id)
    return Samples(
        records=list(records),
        responses=responses,
        prompt_ids=_cat_padded([c[0] for c in chunks], pad, left=True),
        prompt_mask=_cat_padded([c[1] for c in chunks], 0, left=True),
        response_ids=_cat_padded([c[2] for c in chunks], pad, left=False),
        response_mask=_cat_padded([c[3] for c in chunks], 0, left=False),
    )


def _cat_padded(parts: list[torch.Tensor], value: int, *, left: bool) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        fill = p.new_full((p.shape[0], width - p.shape[1]), value)
        padded.append(torch.cat([fill, p] if left else [p, fill], dim=1))
    return torch.cat(padded, dim=0)


def gold_scores(task: Any, records: Sequence[Any], responses: Sequence[str]) -> list[float]:
    return [float(task.gold_score(r, s)) for r, s in zip(records, responses, strict=True)]


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where ``scores`` beats ``baseline``; ties count one half."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win_rate needs two non-empty score lists of equal length")
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)
    )
    return wins / len(scores)


@torch.no_grad()
def sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    samples: Samples,
    *,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> float:
    """Mean over sequences of ``sum_t log pi(y_t|.) - log ref(y_t|.)`` on the policy's samples.

    A Monte-Carlo estimate of KL(pi || ref) per sequence (the k1 estimator summed over the
    response), the quantity RLHF bounds.
    """
    total, rows = 0.0, samples.response_ids.shape[0]
    for start in range(0, rows, batch_size):
        sl = slice(start, start + batch_size)
        rows_of = (
            samples.prompt_ids[sl],
            samples.prompt_mask[sl],
            samples.response_ids[sl],
            samples.response_mask[sl],
        )
        lp = response_logprobs(policy, *rows_of, temperature=temperature)
        lr = response_logprobs(reference, *rows_of, temperature=temperature)
        assert isinstance(lp, torch.Tensor) and isinstance(lr, torch.Tensor)
        total += ((lp - lr) * samples.response_mask[sl]).sum().item()
    return total / max(rows, 1)


def sample_table(
    records: Sequence[Any],
    columns: dict[str, Sequence[str]],
    scores: dict[str, Sequence[float]],
    n: int,
) -> tuple[list[str], list[list[Any]]]:
    """Rows ``prompt | <name> | <name> gold ...`` for the first ``n`` prompts."""
    header = ["prompt"]
    for name in columns:
        header += [name, f"{name} gold"]
    rows = []
    for i, rec in enumerate(records[:n]):
        row: list[Any] = [rec.text]
        for name, responses in columns.items():
            row += [responses[i], round(float(scores[name][i]), 3)]
        rows.append(row)
    return header, rows
