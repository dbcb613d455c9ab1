"""Sweeps: a multirun's W&B offline runs, the joblib launcher, the Optuna sweeper, and the
shipped experiment and sweep configs.

One small RL sweep (2 algorithms x 2 seeds from one shared SFT policy) is run once per test
session by :func:`shared_rl_sweep` and read by these tests and by ``tests/test_compare.py``.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignkit.cli.compare import find_runs
from tests.conftest import REPO, cli_env, run_cli

ALGORITHMS = ("ppo", "grpo")
SEEDS = (0, 1)
# A learning rate large enough that three steps move the policy, so the configurations differ.
RL_ARGS = ["stage=rl", "experiment=smoke", "reward=[gold]", "rl.steps=3", "rl.optim.lr=2e-3"]
SWEEP_PARTS = ("multirun", "2026-01-01", "12-00-00")
GROUP = "2026-01-01_12-00-00"

_SWEEPS: dict[str, Path] = {}


def shared_rl_sweep(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sequential sweep ``algorithm=ppo,grpo seed=0,1`` with W&B offline; run once.

    Cached here rather than only by fixture scope: both test modules ask for it, and a fixture
    imported into two modules would run once per module.
    """
    if "rl" not in _SWEEPS:
        sweep = tmp_path_factory.mktemp("sweeps").joinpath(*SWEEP_PARTS)
        proc = run_cli(
            [
                "-m",
                *RL_ARGS,
                f"model.path={sft_run / 'sft'}",
                f"algorithm={','.join(ALGORITHMS)}",
                f"seed={','.join(map(str, SEEDS))}",
                f"hydra.sweep.dir={sweep}",
            ]
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        _SWEEPS["rl"] = sweep
    return _SWEEPS["rl"]


@pytest.fixture(scope="module")
def rl_sweep(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_rl_sweep(sft_run, tmp_path_factory)


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job directories (nested when an override value holds a ``/``)."""
    return [run for run, _ in find_runs([sweep])]


def job_overrides(job: Path) -> dict[str, str]:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(o.lstrip("+").split("=", 1) for o in overrides)


def summaries_by_job(sweep: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``(algorithm, seed) -> summary.json`` of every job of a sweep."""
    out = {}
    for job in job_dirs(sweep):
        o = job_overrides(job)
        out[(o["algorithm"], o["seed"])] = json.loads((job / "summary.json").read_text())
    return out


# ---------------------------------------------------------------------------------------------
# the sequential sweep and its W&B runs
# ---------------------------------------------------------------------------------------------


def test_multirun_writes_one_grouped_wandb_run_per_job(rl_sweep: Path) -> None:
    from tests.wandb_offline import read_wandb_offline_run

    jobs = job_dirs(rl_sweep)
    assert len(jobs) == len(ALGORITHMS) * len(SEEDS)
    runs = {}
    for job in jobs:
        files = list(job.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"{job}: {files}"
        run = read_wandb_offline_run(files[0])
        # The run id is kept in the run directory, so a resumed job continues the same run.
        assert run["id"] == (job / "wandb_run_id").read_text().strip()
        runs[job] = run
    assert {r["group"] for r in runs.values()} == {GROUP}
    assert len({r["id"] for r in runs.values()}) == len(jobs)
    assert len({r["name"] for r in runs.values()}) == len(jobs)
    seen = set()
    for job, run in runs.items():
        algo, seed = run["config"]["algorithm"]["name"], run["config"]["seed"]
        seen.add((algo, seed))
        assert f"algorithm={algo}" in run["name"] and f"seed={seed}" in run["name"]
        assert run["config"]["stage"] == "rl"
        assert run["config"]["rl"]["steps"] == 3
        assert run["config"]["rl"]["optim"]["lr"] == pytest.approx(2e-3)
        assert set(run["config"]["meta"]) == {"git_commit", "versions"}
        assert {f"algorithm:{algo}", "reward:gold", "backend:cpu"} <= set(run["tags"])
        summary = json.loads((job / "summary.json").read_text())
        for key in ("rl_final/gold/score", "rl_final/reward/total", "rl_final/kl/ref"):
            assert run["summary"][key] == pytest.approx(summary[key])
        assert sorted(row["rl/step"] for row in run["history"] if "rl/step" in row) == [0, 1, 2]
    assert seen == {(a, s) for a in ALGORITHMS for s in SEEDS}


def test_seeds_differ_and_algorithms_differ(rl_sweep: Path) -> None:
    """The sweep is informative: neither the seed nor the algorithm is silently ignored."""
    s = summaries_by_job(rl_sweep)
    key = "rl_final/kl/ref"
    assert s[("ppo", "0")][key] != s[("ppo", "1")][key]
    assert s[("ppo", "0")][key] != s[("grpo", "0")][key]


# ---------------------------------------------------------------------------------------------
# launchers and sweepers (optional extras)
# ---------------------------------------------------------------------------------------------


# Slow: two job processes each import torch and the plugins afresh (30-50 s on two cores).
@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_with_the_same_results(
    rl_sweep: Path, sft_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs sweep-joblib")
    sweep = tmp_path / "joblib"
    proc = run_cli(
        [
            "-m",
            *RL_ARGS,
            "logger=none",
            f"model.path={sft_run / 'sft'}",
            "algorithm=ppo",
            f"seed={','.join(map(str, SEEDS))}",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
            "plugins=[barrier]",
        ],
        # Every job waits at run_start until all have arrived: only parallel jobs can finish.
        env=cli_env(
            ALIGNKIT_PLUGINS="barrier=barrier_plugin",
            PYTHONPATH=str(REPO / "tests"),
            BARRIER_DIR=str(tmp_path / "barrier"),
            BARRIER_N=str(len(SEEDS)),
        ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = job_dirs(sweep)
    assert len(jobs) == len(SEEDS)
    assert len(list((tmp_path / "barrier").iterdir())) == len(SEEDS)  # two worker processes
    parallel, sequential = summaries_by_job(sweep), summaries_by_job(rl_sweep)
    for (algo, seed), summary in parallel.items():
        expected = sequential[(algo, seed)]
        assert summary.keys() == expected.keys()
        for key, value in expected.items():
            assert summary[key] == (
                pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value
            ), key


def test_optuna_sweep_over_the_learning_rate_records_the_best_trial(
    sft_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs sweep-optuna")
    sweep = tmp_path / "optuna"
    objective = "rl_final/gold/score"  # stage=rl has no gold evaluation of its own
    proc = run_cli(
        [
            "-m",
            "+sweep=optuna_lr",
            *[a for a in RL_ARGS if not a.startswith("rl.optim.lr")],
            "logger=none",
            f"model.path={sft_run / 'sft'}",
            "hydra.sweeper.n_trials=3",
            f"objective={objective}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    trials = {}
    for job in job_dirs(sweep):
        lr = float(job_overrides(job)["rl.optim.lr"])
        trials[lr] = json.loads((job / "summary.json").read_text())[objective]
    assert len(trials) == 3  # three trials, three different learning rates
    assert all(1e-6 <= lr <= 1e-3 for lr in trials)
    best_lr = float(results["best_params"]["rl.optim.lr"])
    assert results["best_value"] == pytest.approx(max(trials.values()))  # direction: maximize
    assert trials[best_lr] == pytest.approx(results["best_value"])


# ---------------------------------------------------------------------------------------------
# shipped configs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def compose() -> Iterator[Any]:
    """Hydra's compose API over alignkit's config, with every plugin's schemas registered."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from alignkit.cli import registration

    registration()
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        yield lambda overrides: hydra_compose(
            "config", overrides=overrides, return_hydra_config=True
        )


def _sweep_params(cfg: Any) -> dict[str, list[str]]:
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_compare_algorithms_experiment_sweeps_every_algorithm(compose: Any) -> None:
    params = _sweep_params(compose(["experiment=compare_algorithms"]))
    assert params == {
        "algorithm": [
            *("reinforce", "ppo", "grpo", "rloo", "reinforce_pp", "gspo", "dapo", "cispo"),
            *("remax", "dr_grpo", "dpo", "online_dpo"),
        ],
        "seed": ["0", "1", "2"],
    }
    for algo in params["algorithm"]:
        cfg = compose(["experiment=compare_algorithms", f"algorithm={algo}"])
        assert cfg.algorithm.name == algo
        assert cfg.stage == "pipeline"


def test_rm_variants_experiment_sweeps_the_reward_model_losses(compose: Any) -> None:
    params = _sweep_params(compose(["experiment=rm_variants"]))
    assert params["reward"] == ["bradley_terry", "plackett_luce", "rating_regression"]
    for reward in params["reward"]:
        cfg = compose(["experiment=rm_variants", f"reward={reward}"])
        assert list(cfg.reward) == [reward]
        assert cfg.stage == "reward_model"
        assert cfg.feedback.format == "ratings"  # every loss can learn from ratings


def test_optuna_sweep_config_maximises_over_the_learning_rate(compose: Any) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs sweep-optuna")
    sweeper = compose(["+sweep=optuna_lr"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert "rl.optim.lr" in sweeper.params


def test_slurm_and_joblib_sweep_configs_select_their_launchers(compose: Any) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs sweep-slurm")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs sweep-joblib")
    slurm = compose(["+sweep=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition == "gpu"
    assert slurm.setup == [f"export OMP_NUM_THREADS={slurm.cpus_per_task}"]
    joblib = compose(["+sweep=joblib"])
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
    assert joblib.hydra.launcher.n_jobs == 2


def test_docs_cover_every_shipped_sweep_and_experiment() -> None:
    doc = (REPO / "docs" / "sweeps.md").read_text()
    for path in [*(REPO / "conf" / "sweep").glob("*.yaml"), *_golden_experiments()]:
        assert path.stem in doc, f"docs/sweeps.md does not mention {path.stem}"
    for needle in ("WANDB_API_KEY", "wandb sync", "wandb_run_id", "alignkit compare"):
        assert needle in doc
    image = REPO / "docs" / "images" / "compare.png"
    assert re.search(r"!\[[^\]]*\]\(images/compare\.png\)", doc)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.stat().st_size < 200_000


def _golden_experiments() -> list[Path]:
    return [
        REPO / "conf" / "experiment" / f"{n}.yaml" for n in ("compare_algorithms", "rm_variants")
    ]


# ---------------------------------------------------------------------------------------------
# job folder names
# ---------------------------------------------------------------------------------------------


def _as_run_dir_override(path: Path) -> Any:
    """``run_dir=<path>`` pasted unquoted, parsed by Hydra's own override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"run_dir={path}"])
    return override


def test_every_sweep_folder_pastes_into_a_run_dir_override(rl_sweep: Path, compose: Any) -> None:
    """The shared sweep overrides ``reward=[gold]``: its folders once held ``=,[]``."""
    jobs = job_dirs(rl_sweep)
    assert len(jobs) == len(ALGORITHMS) * len(SEEDS)
    for job in jobs:
        name = job.relative_to(rl_sweep).as_posix()
        assert "/" not in name, f"{name}: one folder per job"
        assert re.fullmatch(r"\d+_[A-Za-z0-9_.+-]+", name), name
        text = f"run_dir={job}"
        assert shlex.split(text) == [text], f"{text}: the shell would need quotes"
        override = _as_run_dir_override(job)
        assert not override.is_sweep_override() and override.value() == str(job)
        assert compose([text]).run_dir == str(job)
    # Readable: what a job overrides is in its name (the job number keeps names unique).
    names = {job.name for job in jobs}
    for algo in ALGORITHMS:
        for seed in SEEDS:
            assert any(f"algorithm-{algo}+" in n and f"+seed-{seed}" in n for n in names), names
    assert all("reward-gold" in n for n in names)


@pytest.mark.parametrize(
    ("override_dirname", "expected"),
    [
        ("algorithm=ppo,reward=[gold],seed=0", "algorithm-ppo+reward-gold+seed-0"),
        ("reward=[gold,bradley_terry],+sweep=joblib", "reward-gold.bradley_terry+sweep-joblib"),
        ("task.columns={prompt: question},x='a b'", "task.columns-prompt-question+x-a-b"),
        ("rl.optim.lr=2e-3,rl.kl_coef=-0.1", "rl.optim.lr-2e-3+rl.kl_coef--0.1"),
        ("task.sft_data=data/sft.jsonl,~eval", "task.sft_data-data-sft.jsonl+eval"),
        ("", "job"),
    ],
)
def test_sweep_subdir_names_are_shell_and_override_safe(
    override_dirname: str, expected: str
) -> None:
    from alignkit.cli.compare import sweep_subdir_name

    name = sweep_subdir_name(override_dirname)
    assert name == expected
    path = Path("multirun/2026-01-01/12-00-00") / f"3_{name}"
    assert shlex.split(f"run_dir={path}") == [f"run_dir={path}"]
    assert _as_run_dir_override(path).value() == str(path)


def test_long_sweep_subdir_names_fit_a_file_name() -> None:
    from alignkit.cli.compare import sweep_subdir_name

    name = sweep_subdir_name(",".join(f"key{i}=value{i}" for i in range(100)))
    assert 0 < len(name) <= 180 and name.startswith("key0-value0+")
