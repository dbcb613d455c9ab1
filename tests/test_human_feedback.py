"""Realistic human feedback: the label budget of the feedback stage, label smoothing for noisy
labels (tests/test_reward_models.py), and the final policy chosen by held-out annotator
comparisons instead of the training reward."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
        "feedback.noise=0",
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
    assert choose({0: 0.5, 15: 0.57, 30: 0.5, 60: 0.57}) == 15  # as good, and nearer the start
    assert choose({0: 0.5, 15: 0.5}) == 0


def test_selection_needs_an_annotator_that_compares() -> None:
    ctx = SimpleNamespace(cfg=SimpleNamespace(feedback=SimpleNamespace(annotator="app")))
    with pytest.raises(ConfigError, match="compares two responses"):
        select_policy(ctx, Snapshots(3), object())  # type: ignore[arg-type]


@dataclasses.dataclass
class _PipelineCtx:
    cfg: Any
    registry: Any


class _Compares:
    def compare(self, record: object, a: str, b: str) -> int:
        return 0

    def rank(self, record: object, responses: list[str]) -> list[int]:
        return list(range(len(responses)))

    def rate(self, record: object, response: str) -> int:
        return 1


class _Batches:
    def label_batch(self, fmt: str, items: list[object]) -> list[object]:
        return []


def _with_selection(annotator: object, rl_every: int = 0, every: int = 15) -> int:
    from omegaconf import OmegaConf

    from alignkit.stages.pipeline import with_selection

    cfg = OmegaConf.create(
        {
            "pipeline": {"select_every": every},
            "rl": {"select_every": rl_every},
            "feedback": {"annotator": "someone"},
        }
    )
    registry = SimpleNamespace(build=lambda kind, name, ctx: annotator)
    ctx = with_selection(_PipelineCtx(cfg, registry))  # type: ignore[arg-type]
    return int(ctx.cfg.rl.select_every)


def test_the_pipeline_selects_only_with_an_annotator_that_compares() -> None:
    assert _with_selection(_Compares()) == 15
    assert _with_selection(_Batches()) == 0  # people in the app give no comparisons
    # An explicit rl.select_every wins; pipeline.select_every=0 turns it off.
    assert _with_selection(_Compares(), rl_every=4) == 4
    assert _with_selection(_Compares(), every=0) == 0


def test_the_default_pipeline_chooses_its_final_policy(tmp_path: Path) -> None:
    """Smoke turns the choice off (three steps); ``pipeline.select_every`` turns it back on."""
    proc = run_cli(
        [*SMOKE, "pipeline.select_every=2", "rl.select_prompts=16", f"run_dir={tmp_path}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rl_final/select/step"] in (0.0, 2.0, 3.0)
    assert 0 < summary["rl_final/select_labels"] <= 2 * 16
    assert summary["feedback_labels"] <= 2200
