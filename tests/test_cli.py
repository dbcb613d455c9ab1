"""The command line as a user meets it: multirun sweeps and an installed wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO, SMOKE, cli_env, run_cli


def test_multirun_runs_every_job_in_its_own_directory(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", "stage=sft", *SMOKE, "sft.steps=5", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    losses = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["stage"] == "sft"
        losses.append(summary["sft_loss"])
        assert (job / "sft" / "model.safetensors").is_file()
    assert losses[0] != losses[1]  # different seeds, different runs


def test_config_help_lists_the_groups() -> None:
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for group in ("reward: bradley_terry", "model: hf, nano, tiny", "backend: cpu"):
        assert group in proc.stdout


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def test_wheel_installs_in_a_fresh_venv_and_runs_sft(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wheel = next(dist.glob("alignkit-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies come from this environment through a path entry (no network, no
    # multi-GB reinstall of torch); alignkit itself only from the wheel, since .pth files
    # inside a path entry (the editable install's finder) are not processed.
    Path(target, "deps.pth").write_text(_site_packages() + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import alignkit, alignkit.conf, alignkit_plugins; "
            "print(alignkit.__file__); print(alignkit.conf.__file__)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(p.startswith(target) for p in where), where
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            str(py),
            "-m",
            "alignkit.cli",
            "stage=sft",
            *SMOKE,
            "sft.steps=5",
            "task.demonstrations=200",
            f"run_dir={run_dir}",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["stage"] == "sft"
    plugins = subprocess.run(
        [str(py), "-m", "alignkit.cli", "plugins"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert "alignkit_plugins.reinforce" in plugins.stdout


def test_multirun_jobs_are_wandb_runs_grouped_by_sweep(tmp_path: Path) -> None:
    from tests.wandb_offline import read_wandb_offline_run

    sweep = tmp_path / "2026-01-01" / "12-00-00"
    proc = run_cli(
        [
            "-m",
            "stage=sft",
            "experiment=smoke",
            "sft.steps=3",
            "eval.num_prompts=4",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_wandb_offline_run(f) for f in sorted(sweep.glob("*/wandb/offline-run-*/*.wandb"))]
    assert len(runs) == 2
    assert {r["group"] for r in runs} == {"2026-01-01_12-00-00"}
    assert sorted(r["name"] for r in runs) == [
        "eval.num_prompts=4,experiment=smoke,seed=0,sft.steps=3,stage=sft",
        "eval.num_prompts=4,experiment=smoke,seed=1,sft.steps=3,stage=sft",
    ]
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1]
    assert all("gold_score_sft" in r["summary"] for r in runs)
