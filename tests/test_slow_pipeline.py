"""Default-budget runs (minutes): ``make test-slow`` and CI run them after the default suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def test_default_sft_budget_lifts_the_gold_score(tmp_path: Path) -> None:
    """The built-in tiny model at the default SFT budget, gold-scored on held-out prompts."""
    proc = run_cli(
        ["stage=sft", "logger=none", f"run_dir={tmp_path}"], env=cli_env(OMP_NUM_THREADS="2")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gold_score_base"] < 0.05
    assert summary["gold_score_sft"] > 0.15
