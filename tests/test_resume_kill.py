"""SIGKILL a run during training and during a checkpoint write; resume; same result.

Every run uses the same command line with ``rl.resume=true`` (resume when a checkpoint
exists, else start): the uninterrupted reference, the killed run and its resumption. PPO with
a shared value head and the adaptive KL controller is used because it has the most state to
restore: policy and critic weights, two optimizers, the schedule, the sampling generator, the
data position and the controller's beta. On the CPU the resumed run is bitwise identical to
the uninterrupted one: the same metrics at every step and the same final weights.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignkit.cli.export import load_checkpoint_model
from alignkit.engine.checkpoint import latest_checkpoint
from alignkit.tracking import read_metrics
from tests.conftest import REPO, cli_env, run_cli

STEPS = 5  # checkpoints after steps 2, 4 and 5


def args(sft_run: Path, run_dir: Path) -> list[str]:
    return [
        "stage=rl",
        "experiment=smoke",
        "algorithm=ppo",
        "algorithm.value_model=shared",
        "algorithm.kl_ctl=adaptive",
        "algorithm.kl_target=0.01",  # far from the measured KL: beta moves every step
        "algorithm.kl_horizon=10",
        "reward=[gold]",
        "logger=none",
        "plugins=[killer]",
        f"rl.steps={STEPS}",
        "rl.checkpoint_every=2",
        "rl.resume=true",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={run_dir}",
    ]


def env(**extra: str) -> dict[str, str]:
    return cli_env(ALIGNKIT_PLUGINS="killer=kill_plugin", PYTHONPATH=str(REPO / "tests"), **extra)


def run_and_kill(cmd_args: list[str], marker: Path, **extra: str) -> None:
    """Start the run, wait until the plugin parks it, SIGKILL it."""
    cmd = [sys.executable, "-m", "alignkit.cli", *cmd_args]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(KILL_MARKER=str(marker), **extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it was killed: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run never reached the kill point")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def rl_records(run_dir: Path) -> list[dict]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def assert_checkpoints_usable(run_dir: Path, expected: str) -> None:
    """``latest`` names a complete checkpoint whose weights load."""
    path = latest_checkpoint(run_dir / "rl")
    assert path is not None and path.name == expected
    load_checkpoint_model(path)


@pytest.fixture(scope="module")
def reference(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(args(sft_run, run_dir), env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    got, want = rl_records(run_dir), rl_records(reference)
    assert [r["step"] for r in got] == list(range(STEPS))  # no step twice, none missing
    assert got == want  # bitwise: every logged number of every step
    assert want[-1]["kl/coef"] != want[0]["kl/coef"]  # the controller state really moved
    final, ref = (load_file(d / "rl/policy/model.safetensors") for d in (run_dir, reference))
    assert final.keys() == ref.keys()
    assert all(final[k].equal(ref[k]) for k in ref)
    summary, ref_summary = (
        json.loads((d / "summary.json").read_text()) for d in (run_dir, reference)
    )
    drop = [k for k in ref_summary if k.startswith("rl_final/time/")]
    assert {k: v for k, v in summary.items() if k not in drop} == {
        k: v for k, v in ref_summary.items() if k not in drop
    }


@pytest.mark.slow  # ~35 s on top of the shared reference run
def test_killed_during_training_resumes_to_the_same_result(
    sft_run: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_and_kill(args(sft_run, run_dir), tmp_path / "parked", KILL_AT_STEP="3")
    assert_checkpoints_usable(run_dir, "step_000002")
    proc = run_cli(args(sft_run, run_dir), env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert_same_as_reference(run_dir, reference)


def test_killed_during_a_checkpoint_write_keeps_the_previous_one(
    sft_run: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_and_kill(args(sft_run, run_dir), tmp_path / "parked", KILL_IN_SAVE="step_000004")
    root = run_dir / "rl" / "checkpoints"
    # The half-written checkpoint exists only as a hidden temporary directory.
    assert [p.name.startswith(".step_000004.") for p in root.glob(".*.tmp")] == [True]
    assert not (root / "step_000004").exists()
    assert_checkpoints_usable(run_dir, "step_000002")
    proc = run_cli(args(sft_run, run_dir), env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_as_reference(run_dir, reference)
    assert not list(root.glob(".*.tmp"))  # the leftover was cleaned up by the next save
    assert_checkpoints_usable(run_dir, f"step_{STEPS:06d}")
