"""Held-out evaluation: sample a policy, then score or compare its responses.

The pieces :func:`alignkit.stages.evaluate.compare_policies` combines: sampling
(:func:`sample_policy`), the gold oracle of the built-in task (:func:`gold_scores`), win-rates
from per-sample scores (:func:`win_rate`) or from a pairwise judge's probabilities
(:func:`judge_win_rates`), response length (:func:`mean_length`), a Monte-Carlo KL
(:func:`sequence_kl`) and the sample table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.data.chat import PromptFormat
from alignkit.data.prompts import encode_prompts
from alignkit.models import response_logprobs
from alignkit.models.generation import decode_responses, generate


@dataclass
class Samples:
    """Responses of one policy on a list of prompts, with token tensors for KL estimates."""

    records: list[Any]
    responses: list[str]
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R)
    finished: list[bool] | None = None
    """Per row, whether the response emitted a stop token (False: cut at the length limit)."""


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
    fmt: PromptFormat | None = None,
) -> Samples:
    """One response per record, generated in batches.

    Prompts are rendered by ``fmt`` (default: the tokenizer's chat template if it has one,
    else the plain format; stages pass the run's ``task.template`` through
    :func:`alignkit.data.prompts.prompt_format`).
    """
    model.eval()
    fmt = fmt if fmt is not None else PromptFormat(tokenizer, model=model)
    device = next(model.parameters()).device  # prompts are encoded on the CPU
    chunks, finished = [], []
    for start in range(0, len(records), batch_size):
        part = records[start : start + batch_size]
        ids, mask, _ = encode_prompts(fmt, task, part, max_prompt_tokens)
        ids, mask = ids.to(device), mask.to(device)
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=fmt.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            temperature=temperature,
            greedy=greedy,
            generator=generator,
            return_logprobs=False,
        )
        chunks.append((ids, mask, out.response_ids, out.response_mask))
        finished += [bool(f) for f in out.finished.tolist()]
    responses: list[str] = []
    for _, _, rids, rmask in chunks:
        responses += decode_responses(tokenizer, rids, rmask, fmt.stop_ids)
    pad = int(tokenizer.pad_token_id)
    return Samples(
        records=list(records),
        responses=responses,
        prompt_ids=_cat_padded([c[0] for c in chunks], pad, left=True),
        prompt_mask=_cat_padded([c[1] for c in chunks], 0, left=True),
        response_ids=_cat_padded([c[2] for c in chunks], pad, left=False),
        response_mask=_cat_padded([c[3] for c in chunks], 0, left=False),
        finished=finished,
    )


def _cat_padded(parts: list[torch.Tensor], value: int, *, left: bool) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        fill = p.new_full((p.shape[0], width - p.shape[1]), value)
        padded.append(torch.cat([fill, p] if left else [p, fill], dim=1))
    return torch.cat(padded, dim=0)


def gold_scores(task: Any, records: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """The task's gold score of each (record, response)."""
    return [float(task.gold_score(r, s)) for r, s in zip(records, responses, strict=True)]


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where ``scores`` beats ``baseline``; ties count one half."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win_rate needs two non-empty score lists of equal length")
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)
    )
    return wins / len(scores)


def judge_win_rates(prob_a: Sequence[float]) -> tuple[float, float]:
    """(soft, hard) win-rate of response a from a pairwise judge's ``P(a > b)`` per pair.

    soft = ``mean_i p_i``; hard = ``mean_i [p_i > 0.5] + 0.5 [p_i = 0.5]``, i.e. each pair is
    a win, a loss or (at exactly 0.5) a tie, as :func:`win_rate` counts gold scores.
    """
    if not prob_a:
        raise ValueError("judge_win_rates needs at least one judged pair")
    soft = sum(float(p) for p in prob_a) / len(prob_a)
    return soft, win_rate([float(p) for p in prob_a], [0.5] * len(prob_a))


def mean_length(response_mask: torch.Tensor) -> float:
    """Mean response length in tokens of a (B, R) response mask (EOS counted, padding not)."""
    if response_mask.dim() != 2 or response_mask.shape[0] == 0:
        raise ValueError(f"expected a (B, R) mask, got shape {tuple(response_mask.shape)}")
    return float(response_mask.float().sum(dim=1).mean())


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
    scores: dict[str, dict[str, Sequence[float]]],
    n: int,
    pair_scores: dict[str, Sequence[float]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """Rows ``prompt | <name> | <name> <score> ... | <pair score> ...`` for the first ``n``.

    Args:
        records: the prompt records, one per sample row.
        columns: policy name -> its responses (one per record).
        scores: policy name -> score name (``gold``, ``rm``) -> one value per record; a
            policy may have none.
        n: rows to show.
        pair_scores: column name -> one value per record for the pair (e.g. the judge's
            ``P(policy better)``), appended last.
    """
    header = ["prompt"]
    for name in columns:
        header += [name, *(f"{name} {kind}" for kind in scores.get(name, {}))]
    header += list(pair_scores or {})
    rows = []
    for i, rec in enumerate(records[:n]):
        row: list[Any] = [getattr(rec, "text", str(rec))]
        for name, responses in columns.items():
            row.append(responses[i])
            row += [round(float(v[i]), 3) for v in scores.get(name, {}).values()]
        row += [round(float(v[i]), 3) for v in (pair_scores or {}).values()]
        rows.append(row)
    return header, rows
