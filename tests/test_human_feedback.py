"""Realistic human feedback: the label budget of the feedback stage, label smoothing for noisy
labels (tests/test_reward_models.py), and the final policy chosen by held-out annotator
comparisons instead of the training reward."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from alignkit.errors import ConfigError
from alignkit.stages.feedback import budgeted, label_cost
from alignkit.stages.select import Snapshots, choose, select_policy
from alignkit.tracking import read_metrics

from .conftest import SMOKE, run_cli


def test_label_cost_counts_the_comparisons_a_label_implies() -> None:
    assert [label_cost("rankings", k) for k in (2, 4, 6)] == [1, 6, 15]
    assert label_cost("pairwise", 4) == 6 and label_cost("ratings", 4) == 4


def test_the_budget_stops_before_it_would_be_exceeded() -> None:
    records = ["a", "b", "c", "d"]
    responses = [["x", "y", "z"], ["x"], ["x", "y"], ["x", "y", "z", "w"]]
    # a costs 3, b has nothing to compare, c costs 1, d would cost 6 > 10 - 4
    chosen = budgeted("rankings", records, responses, 9)
    assert [r for r, _ in chosen] == ["a", "c"]
    assert [r for r, _ in budgeted("rankings", records, responses, None)] == ["a", "c", "d"]
    assert [r for r, _ in budgeted("ratings", records, responses, 6)] == ["a", "b", "c"]


def test_the_feedback_stage_spends_at_most_its_budget(sft_run: Path, tmp_path: Path) -> None:
    args = ["stage=feedback", *SMOKE, "feedback.samples_per_prompt=4", "feedback.max_labels=20"]
    proc = run_cli([*args, f"feedback.policy={sft_run / 'sft'}", f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["feedback_labels"] <= 20
    lines = (tmp_path / "feedback" / "rankings.jsonl").read_text().splitlines()
    spent = sum(label_cost("rankings", len(json.loads(line)["responses"])) for line in lines)
    assert spent == summary["feedback_labels"] and len(lines) == summary["feedback_prompts"]


def test_a_policy_trained_to_be_worse_is_not_kept(sft_run: Path, tmp_path: Path) -> None:
    """RL that minimises the gold score: the annotator (the noise-free simulated human)
    prefers the start policy to every later one, so the saved policy is the start's."""
    args = [
        "stage=rl",
        *SMOKE,
        "reward=[gold]",
        "reward.gold.weight=-1",
        "rl.steps=6",
        "rl.optim.lr=1e-3",
        "rl.select_every=3",
        "rl.select_prompts=32",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path}",
    ]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rl_final/select/step"] == 0
    assert summary["rl_final/select/win_rate_6"] < 0.5 and summary["rl_final/select_labels"] > 0
    start = load_file(sft_run / "sft" / "model.safetensors")
    final = load_file(tmp_path / "rl" / "policy" / "model.safetensors")
    assert all(torch.equal(start[k], final[k]) for k in start)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "select/step" in r]
    assert len(rows) == 1  # logged once, after training


def test_the_choice_is_the_highest_win_rate_and_the_start_when_all_lose() -> None:
    assert choose({0: 0.5, 15: 0.61, 30: 0.58}) == 15
    assert choose({0: 0.5, 15: 0.44, 30: 0.31}) == 0
    assert choose({0: 0.5, 15: 0.5}) == 15  # as good, and trained longer


def test_selection_needs_an_annotator_that_compares() -> None:
    ctx = SimpleNamespace(cfg=SimpleNamespace(feedback=SimpleNamespace(annotator="app")))
    with pytest.raises(ConfigError, match="compares two responses"):
        select_policy(ctx, Snapshots(3), object())  # type: ignore[arg-type]
