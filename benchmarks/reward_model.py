"""Reward-model throughput on CPU at the built-in model size, with peak memory.

Builds the built-in task's tiny GPT-2 backbone (4 layers, 4 heads, width 256 by default) with
a scalar head, and feedback shaped like ``stage=feedback``'s: K-wise rankings of the task's
response variants (ideal, verbose, wrong, unsafe) on the training prompts. Then measures::

    training   optimiser steps of the Bradley-Terry loss (forward, backward, AdamW), as
               pairs/s (ordered pairs of the rankings), groups/s and sequences/s
    scoring    batched reward-model scoring of (prompt, response) texts, sequences/s
               (tokenisation included, as in the RL reward hook)

and the peak resident memory of the process (after each phase, and before anything is built,
i.e. the libraries alone).

    python benchmarks/reward_model.py [--steps 10] [--batch-groups 16] [--score 1024] \\
        [--score-batch 64] [--threads 1] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from alignkit_plugins.bradley_terry import BradleyTerryLoss
from transformers import AutoTokenizer

from alignkit.data.feedback import PreferenceGroup, RankingFeedback, to_groups
from alignkit.models import ScalarHeadModel, TinyModelSpec, build_tiny_model, count_parameters
from alignkit.reward_models import RewardScorer
from alignkit.stages.reward_model import TrainSettings, train_reward_model
from alignkit.tasks import QUALITIES, AssistTask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="measured training steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured training steps first")
    p.add_argument("--batch-groups", type=int, default=16, help="rankings per training step")
    p.add_argument("--score", type=int, default=1024, help="sequences to score")
    p.add_argument("--score-batch", type=int, default=64, help="sequences per scoring forward")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def feedback_groups(task: AssistTask, seed: int) -> list[PreferenceGroup]:
    """One K = 4 ranking per training prompt over its response variants, ranked by gold."""
    rng = random.Random(seed)
    records = []
    for record in task.train_prompts():
        variants = task.response_variants(record, rng)
        responses = list(dict.fromkeys(variants[q] for q in QUALITIES))
        golds = [task.gold_score(record, r) for r in responses]
        ranks = [sorted(set(golds), reverse=True).index(g) for g in golds]
        records.append(
            RankingFeedback(task.format_prompt(record), responses, ranks, prompt_id=record.id)
        )
    return [g for g in to_groups(records) if g.pairs]


def build_backbone(folder: Path, task: AssistTask, args: argparse.Namespace) -> Path:
    spec = TinyModelSpec(n_layer=args.layers, n_head=args.heads, n_embd=args.width, seed=args.seed)
    return build_tiny_model(folder / "backbone", task.corpus(), spec)


def measure_training(
    model: ScalarHeadModel, tok: Any, groups: list[PreferenceGroup], args: argparse.Namespace
) -> dict[str, float]:
    loss = BradleyTerryLoss()
    settings = TrainSettings(steps=args.warmup, batch_size=args.batch_groups, seed=args.seed)
    if args.warmup:
        train_reward_model(model, tok, groups, loss, settings)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_groups, seed=args.seed + 1)
    metrics = train_reward_model(model, tok, groups, loss, settings)
    seconds = metrics["rm_train_seconds"]
    return {
        "train_seconds": seconds,
        "train_steps": float(args.steps),
        "train_pairs_per_second": metrics["rm_pairs_per_second"],
        "train_groups_per_second": args.steps * args.batch_groups / seconds,
        "train_sequences_per_second": metrics["rm_sequences_per_second"],
        "train_peak_rss_mib": peak_rss_mib(),
    }


def measure_scoring(
    model: ScalarHeadModel, tok: Any, groups: list[PreferenceGroup], args: argparse.Namespace
) -> dict[str, float]:
    texts = [(g.prompt, r) for g in groups for r in g.responses]
    texts = [texts[i % len(texts)] for i in range(args.score)]
    scorer = RewardScorer(model, tok, batch_size=args.score_batch)
    scorer.score([p for p, _ in texts[:64]], [r for _, r in texts[:64]])  # warm-up
    start = time.perf_counter()
    scorer.score([p for p, _ in texts], [r for _, r in texts])
    seconds = time.perf_counter() - start
    return {
        "score_seconds": seconds,
        "score_sequences": float(len(texts)),
        "score_sequences_per_second": len(texts) / seconds,
        "score_peak_rss_mib": peak_rss_mib(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    baseline = peak_rss_mib()  # torch and transformers imported, nothing built yet
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = AssistTask()
    groups = feedback_groups(task, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_backbone(Path(tmp), task, args)
        model = ScalarHeadModel.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
    result: dict[str, Any] = {
        "model": {
            "layers": args.layers,
            "heads": args.heads,
            "width": args.width,
            "parameters": count_parameters(model),
        },
        "threads": args.threads,
        "baseline_rss_mib": baseline,
        "batch_groups": args.batch_groups,
        "mean_responses_per_group": sum(len(g.responses) for g in groups) / len(groups),
    }
    result |= measure_training(model, tok, groups, args)
    result |= measure_scoring(model, tok, groups, args)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
