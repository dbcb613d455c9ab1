"""Sample tables during RL, and resuming a run: same trajectory position, same W&B run."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.tracking import read_metrics
from tests.conftest import run_cli
from tests.wandb_offline import read_wandb_offline_run

RL = ["stage=rl", "experiment=smoke", "algorithm=reinforce", "reward=[gold]"]


def test_resume_continues_the_steps_and_the_wandb_run(sft_run: Path, tmp_path: Path) -> None:
    base = [*RL, f"model.path={sft_run / 'sft'}", f"run_dir={tmp_path}", "rl.samples_every=2"]
    first = run_cli([*base, "rl.steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((tmp_path / "rl_samples_step_000002.json").read_text())
    assert table["columns"] == ["step", "prompt", "response", "gold", "oracle"]
    assert len(table["rows"]) == 8 and table["rows"][0][0] == 2
    assert (tmp_path / "rl" / "checkpoints" / "latest").read_text().strip() == "step_000003"

    second = run_cli([*base, "rl.steps=5", "rl.resume=true"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert steps == [0, 1, 2, 3, 4]  # no step repeated, none skipped
    runs = [read_wandb_offline_run(f) for f in tmp_path.glob("wandb/offline-run-*/run-*.wandb")]
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
