"""The default pipeline, on realistic human feedback, does not make the policy worse (``make
test-slow``; docs/feedback.md, "Realistic human feedback", has the full-budget figures).

The default annotator: rankings of 6 responses with label noise at the published
inter-annotator agreement, a budget of 2200 labels, and the final policy chosen by the
annotator's comparisons, never by the training reward or the gold oracle. Here at a smaller
RL budget (30 steps, a policy kept every 10).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def test_noisy_scarce_labels_do_not_make_the_policy_worse(tmp_path: Path) -> None:
    args = ["rl.steps=30", "pipeline.select_every=10", "logger=none"]
    proc = run_cli([*args, f"run_dir={tmp_path}"], env=cli_env(OMP_NUM_THREADS="2"), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["feedback_labels"] <= 2200
    assert 0 < summary["rl_final/select_labels"] <= 3 * 64
    assert summary["gold_score_policy"] >= summary["gold_score_sft"], summary
