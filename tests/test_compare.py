"""``alignkit compare``: grouping, confidence intervals, the plots, the table and the report.

The end-to-end tests read the shared RL sweep of ``tests/test_sweeps.py`` (2 algorithms x 2
seeds) and check every number against values computed here from the run files; the unit tests
build small run directories by hand.
"""

from __future__ import annotations

import base64
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignkit.cli import compare
from tests.conftest import run_cli
from tests.test_sweeps import ALGORITHMS, SEEDS, job_dirs, shared_rl_sweep

CURVE_KEYS = ("gold/score", "reward/total", "kl/ref", "response/length")
RL_FINAL = ("rl_final/gold/score", "rl_final/reward/total", "rl_final/kl/ref")


@pytest.fixture(scope="module")
def rl_sweep(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_rl_sweep(sft_run, tmp_path_factory)


@pytest.fixture(scope="module")
def report(rl_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``alignkit compare <sweep> --out <dir>``, run once for the end-to-end tests."""
    out = tmp_path_factory.mktemp("compare")
    proc = run_cli(["compare", str(rl_sweep), "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def ci(values: list[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple:
    """Mean, low and high of the seeded 95% percentile bootstrap, clipped to ``bounds``."""
    import numpy as np
    from scipy.stats import bootstrap

    mean = sum(values) / len(values)
    if min(values) == max(values):
        return mean, mean, mean
    res = bootstrap(
        (np.asarray(values),),
        np.mean,
        n_resamples=9999,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    low = min(max(res.low, bounds[0]), mean)
    return mean, low, max(min(res.high, bounds[1]), mean)


def expected_runs(sweep: Path) -> dict[str, list[Path]]:
    """Algorithm -> its job directories, from each job's Hydra overrides."""
    out: dict[str, list[Path]] = defaultdict(list)
    for job in job_dirs(sweep):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        algo = next(o.split("=", 1)[1] for o in overrides if o.startswith("algorithm="))
        out[algo].append(job)
    return out


def rl_curve(job: Path, key: str) -> dict[int, float]:
    curve = {}
    for line in (job / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["stage"] == "rl" and key in record:
            curve[record["step"]] = float(record[key])
    return curve


# ---------------------------------------------------------------------------------------------
# end to end, on the shared sweep
# ---------------------------------------------------------------------------------------------


def test_compare_writes_the_pngs_the_html_report_and_the_sidecar(report: Path) -> None:
    for name in ("curves.png", "final_metrics.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (report / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [
        (report / "curves.png").read_bytes(),
        (report / "final_metrics.png").read_bytes(),
    ]
    # Self-contained: nothing is loaded from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert json.loads((report / "compare.json").read_text())["ci"] == compare.CI_METHOD


def test_one_curve_per_configuration_with_the_mean_across_seeds(
    rl_sweep: Path, report: Path
) -> None:
    data = json.loads((report / "compare.json").read_text())
    runs = expected_runs(rl_sweep)
    assert {c["label"] for c in data["configurations"]} == {f"algorithm={a}" for a in ALGORITHMS}
    for config in data["configurations"]:
        assert sorted(config["seeds"]) == [str(s) for s in SEEDS]
    for key in CURVE_KEYS:
        assert set(data["curves"][key]) == {f"algorithm={a}" for a in ALGORITHMS}, key
        for algo, jobs in runs.items():
            series = data["curves"][key][f"algorithm={algo}"]
            curves = [rl_curve(job, key) for job in jobs]
            assert series["step"] == [0, 1, 2]
            assert series["n"] == [len(SEEDS)] * 3
            for i, step in enumerate(series["step"]):
                mean, low, high = ci([c[step] for c in curves], compare.metric_range(key))
                assert series["mean"][i] == pytest.approx(mean, rel=1e-9, abs=1e-12)
                assert series["low"][i] == pytest.approx(low, rel=1e-9, abs=1e-12)
                assert series["high"][i] == pytest.approx(high, rel=1e-9, abs=1e-12)
            # Per-seed lines: each run's own curve, as logged.
            assert {rl_curve(j, key)[0] for j in jobs} == {
                r["value"][0] for r in series["runs"].values()
            }
            assert set(series["runs"]) == {f"seed={s}" for s in SEEDS}


def test_plotted_figure_has_one_line_per_configuration(rl_sweep: Path) -> None:
    comparison = compare.compare_runs([rl_sweep])
    fig = compare.curves_figure(comparison)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == compare.CURVES["gold/score"]
    # The sweep runs RL on reward=[gold]: its reward panel must not claim a learned reward.
    assert "gold" in titles[1] and "learned reward" not in titles[1]
    runs = expected_runs(rl_sweep)
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        seeds = {k for k in lines if k.startswith("_")}  # thin per-seed lines, not in legends
        assert seeds == {f"_algorithm={a} seed={s}" for a in ALGORITHMS for s in SEEDS}
        lines = {k: v for k, v in lines.items() if k not in seeds}
        assert set(lines) == {f"algorithm={a}" for a in ALGORITHMS}
        for algo, jobs in runs.items():
            ys = lines[f"algorithm={algo}"].get_ydata()
            want = [statistics.fmean(rl_curve(j, key)[s] for j in jobs) for s in (0, 1, 2)]
            assert list(ys) == pytest.approx(want)
        assert len(ax.collections) == len(ALGORITHMS)  # one confidence band each


def test_final_table_holds_mean_and_ci_of_the_summaries(rl_sweep: Path, report: Path) -> None:
    data = json.loads((report / "compare.json").read_text())
    # stage=rl runs have no gold evaluation: the table falls back to the RL final metrics.
    assert data["table_metrics"][: len(RL_FINAL)] == list(RL_FINAL)
    page = (report / "report.html").read_text()
    stdout = (report / "stdout.txt").read_text()
    for algo, jobs in expected_runs(rl_sweep).items():
        row = data["table"][f"algorithm={algo}"]
        for key in RL_FINAL:
            values = [json.loads((j / "summary.json").read_text())[key] for j in jobs]
            mean, low, high = ci(values, compare.metric_range(key))
            assert row[key]["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
            assert row[key]["low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
            assert row[key]["high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
            assert row[key]["n"] == len(SEEDS)
            shown = f"{mean:.4g} [{low:.3g}, {high:.3g}]" if low != high else f"{mean:.4g}"
            assert shown in page, (algo, key, shown)
            assert shown in stdout, (algo, key, shown)
        assert f"algorithm={algo}" in stdout


def test_compare_accepts_a_list_of_run_directories(rl_sweep: Path, tmp_path: Path) -> None:
    ppo = expected_runs(rl_sweep)["ppo"]
    assert compare.main([*map(str, ppo), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert len(data["configurations"]) == 1
    assert sorted(data["configurations"][0]["runs"]) == sorted(str(p.resolve()) for p in ppo)


# ---------------------------------------------------------------------------------------------
# units, on hand-made run directories
# ---------------------------------------------------------------------------------------------


def make_run(
    path: Path,
    overrides: list[str] | None,
    rl: dict[str, list[Any]] | None = None,
    summary: dict[str, Any] | None = None,
    extra_records: list[dict[str, Any]] | None = None,
) -> Path:
    """A run directory as the tracker and Hydra leave it."""
    path.mkdir(parents=True)
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rl = rl or {}
    steps = max((len(v) for v in rl.values()), default=0)
    records = [{"stage": "rl", "step": i, **{k: v[i] for k, v in rl.items()}} for i in range(steps)]
    records += extra_records or []
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_mean_ci_of_known_values() -> None:
    e = compare.mean_ci([1.0, 2.0, 3.0, float("nan")])  # NaN is a missing value, not a zero
    assert (e.mean, e.n) == (2.0, 3)
    assert (e.low, e.high) == pytest.approx(ci([1.0, 2.0, 3.0])[1:])
    one = compare.mean_ci([5.0])
    assert (one.low, one.high, one.n) == (5.0, 5.0, 1)
    assert compare.mean_ci([]).n == 0


def test_runs_are_grouped_by_overrides_minus_the_seed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # Win rates and scores live in [0, 1].
    values = {("a", 0): 0.1, ("a", 1): 0.3, ("b", 0): 0.5, ("b", 1): 0.75, ("b", 2): 0.625}
    for i, ((algo, seed), v) in enumerate(values.items()):
        make_run(
            sweep / f"{i}_algorithm={algo},seed={seed}",
            ["stage=rl", f"algorithm={algo}", f"seed={seed}"],
            rl={"gold/score": [0.0, v]},
            summary={"gold_win_rate": v, "gold_score_policy": v / 2, "stage": "rl"},
        )
    c = compare.compare_runs([sweep])
    assert [(cfg.label, len(cfg.runs)) for cfg in c.configurations] == [
        ("algorithm=a", 2),
        ("algorithm=b", 3),
    ]
    assert c.table_metrics == ["gold_win_rate", "gold_score_policy"]
    b = c.table["algorithm=b"]["gold_win_rate"]
    assert (b.mean, b.n) == (pytest.approx(0.625), 3)
    assert (b.low, b.high) == pytest.approx(ci([0.5, 0.75, 0.625])[1:])
    curve = c.curves["gold/score"]["algorithm=a"]
    assert curve.steps == [0, 1]
    assert [e.mean for e in curve.estimates] == pytest.approx([0.0, 0.2])
    # --ignore: with the algorithm ignored too, everything is one configuration.
    merged = compare.compare_runs([sweep], ignore=["seed", "algorithm"])
    assert [len(cfg.runs) for cfg in merged.configurations] == [5]


def test_directory_names_stand_in_for_missing_hydra_files(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_lr=0.1,seed=0", None, summary={"kl_to_sft": 1.0})
    make_run(sweep / "1_lr=0.1,seed=1", None, summary={"kl_to_sft": 3.0})
    make_run(sweep / "2_lr=[1,2],seed=0", None, summary={"kl_to_sft": 7.0})
    c = compare.compare_runs([sweep])
    assert {cfg.label: len(cfg.runs) for cfg in c.configurations} == {
        "lr=0.1": 2,
        "lr=[1,2]": 1,
    }
    assert c.table["lr=0.1"]["kl_to_sft"].mean == 2.0


def test_nested_job_dirs_and_numeric_job_order(tmp_path: Path) -> None:
    """``model.path=a/b`` nests a job folder; job 10 sorts after job 9."""
    sweep = tmp_path / "sweep"
    for i in (10, 9):
        make_run(sweep / f"{i}_model.path=runs" / "sft,seed=0", [f"x={i}"], summary={"k": i})
    runs = compare.find_runs([sweep])
    assert [json.loads((r / "summary.json").read_text())["k"] for r, _ in runs] == [9, 10]


def test_resumed_steps_keep_the_last_record_and_other_stages_are_skipped(tmp_path: Path) -> None:
    run = make_run(
        tmp_path / "run",
        ["seed=0"],
        rl={"kl/ref": [0.1, 0.2, 0.3]},
        extra_records=[
            {"stage": "rl", "step": 2, "kl/ref": 0.5},  # resumed from the step-1 checkpoint
            {"stage": "rl", "step": 3, "kl/ref": "nan"},
            {"stage": "sft", "step": 0, "kl/ref": 99.0},
        ],
    )
    kl = compare.read_curves(run, "rl")["kl/ref"]
    assert sorted(kl) == [0, 1, 2, 3]
    assert [kl[0], kl[1], kl[2]] == [0.1, 0.2, 0.5]
    assert math.isnan(kl[3])
    series = compare.aggregate_curve([compare.load_runs([run], "rl")[0]], "kl/ref")
    assert series.estimates[3].n == 0  # a NaN step has no value to average


def test_requested_metrics_and_missing_values(tmp_path: Path, capsys: Any) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_seed=0", ["seed=0"], summary={"a": 1.0})
    make_run(sweep / "1_seed=1", ["seed=1"], summary={"a": 2.0, "b": 4.0})
    make_run(sweep / "2_seed=2", ["seed=2"])  # crashed before writing summary.json
    out = tmp_path / "out"
    assert compare.main([str(sweep), "--out", str(out), "--metrics", "b", "a"]) == 0
    data = json.loads((out / "compare.json").read_text())
    (row,) = data["table"].values()  # the seeds are repeats: one configuration
    # Only one seed has b: its value alone; the seed that crashed is simply not counted.
    assert row["b"] == {"mean": 4.0, "low": 4.0, "high": 4.0, "n": 1}
    assert row["a"]["n"] == 2
    printed = capsys.readouterr().out
    assert "report.html" in printed


def test_default_out_is_inside_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep / "0_seed=0", ["seed=0"], summary={"a": 1.0})
    assert compare.main([str(sweep)]) == 0
    assert (sweep / "compare" / "report.html").is_file()
    # The report folder holds no run: comparing again finds the same single run.
    assert len(compare.find_runs([sweep])) == 1


def test_no_runs_is_an_error(tmp_path: Path, capsys: Any) -> None:
    assert compare.main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_usage_errors_return_a_status(capsys: Any) -> None:
    assert compare.main(["--help"]) == 0
    assert "alignkit compare" in capsys.readouterr().out
    assert compare.main(["--no-such-option", "x"]) == 2
    assert "usage: alignkit compare" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# honest intervals, per-seed lines, named bars, the reward panel, unknown metrics
# ---------------------------------------------------------------------------------------------


def _two_seed_sweep(root: Path, reward: str = "gold") -> Path:
    """Two configurations x two seeds whose t-interval would leave [0, 1] and go below 0."""
    sweep = root / "sweep"
    values = {
        ("a", 0): (0.05, 2.0),
        ("a", 1): (0.95, 40.0),
        ("b", 0): (0.4, 5.0),
        ("b", 1): (0.6, 7.0),
    }
    for i, ((algo, seed), (score, length)) in enumerate(values.items()):
        run = make_run(
            sweep / f"{i}_algorithm-{algo}+seed-{seed}",
            [f"algorithm={algo}", f"seed={seed}"],
            rl={
                "gold/score": [0.5, score],
                "response/length": [10.0, length],
                "reward/total": [0, 1],
            },
            summary={"gold_score_policy": score, "gold_win_rate": score, "kl_to_sft": 0.1 * i},
        )
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"reward": {reward: {}}}))
    return sweep


def test_few_seed_intervals_stay_inside_the_metric_range(tmp_path: Path) -> None:
    c = compare.compare_runs([_two_seed_sweep(tmp_path)])
    a = c.table["algorithm=a"]["gold_score_policy"]
    assert a.mean == pytest.approx(0.5) and 0.0 <= a.low <= a.mean <= a.high <= 1.0
    for series in c.curves["gold/score"].values():
        assert all(0.0 <= e.low <= e.mean <= e.high <= 1.0 for e in series.estimates)
    for series in c.curves["response/length"].values():
        assert all(e.low >= 0.0 for e in series.estimates)
    # Clipping applies to the bootstrap's own bounds too: a [0, 1] score never leaves [0, 1].
    e = compare.mean_ci([0.0, 0.0, 1.0], bounds=(0.0, 1.0))
    assert e.low >= 0.0 and e.high <= 1.0
    assert compare.metric_range("rl_final/response/length") == (0.0, math.inf)
    assert compare.metric_range("kl/ref") == (-math.inf, math.inf)


def test_interval_is_scipy_percentile_bootstrap_and_reproducible() -> None:
    values = [0.31, 0.42, 0.38, 0.55, 0.47]
    e = compare.mean_ci(values)
    assert (e.low, e.high) == pytest.approx(ci(values)[1:])
    assert compare.mean_ci(values) == e  # seeded: the same report every time
    assert "bootstrap" in compare.CI_METHOD


def test_every_seed_has_its_own_line(tmp_path: Path) -> None:
    c = compare.compare_runs([_two_seed_sweep(tmp_path)])
    fig = compare.curves_figure(c)
    ax = next(ax for ax in fig.axes if ax.get_title() == compare.CURVES["gold/score"])
    seed_lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert seed_lines["_algorithm=a seed=0"] == [0.5, 0.05]
    assert seed_lines["_algorithm=a seed=1"] == [0.5, 0.95]
    assert seed_lines["algorithm=a"] == pytest.approx([0.5, 0.5])


def test_bars_are_labelled_with_configuration_names(tmp_path: Path) -> None:
    c = compare.compare_runs([_two_seed_sweep(tmp_path)])
    fig = compare.final_figure(c)
    for ax in (ax for ax in fig.axes if ax.get_visible() and ax.get_title()):
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["algorithm=a", "algorithm=b"], ticks
        # One dot per seed on each bar.
        from matplotlib.collections import PathCollection

        dots = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert sum(len(c.get_offsets()) for c in dots) == 4


@pytest.mark.parametrize(
    ("reward", "expected"),
    [("gold", "gold reward"), ("bradley_terry", "learned reward (bradley_terry)")],
)
def test_reward_panel_is_named_after_the_reward_used(
    tmp_path: Path, reward: str, expected: str
) -> None:
    c = compare.compare_runs([_two_seed_sweep(tmp_path, reward)])
    assert c.curve_titles["reward/total"].startswith(expected)
    fig = compare.curves_figure(c)
    assert c.curve_titles["reward/total"] in [ax.get_title() for ax in fig.axes]
    if reward == "gold":
        assert "learned" not in c.curve_titles["reward/total"].replace("not learned", "")


def test_unknown_metrics_are_an_error_listing_the_available_ones(
    tmp_path: Path, capsys: Any
) -> None:
    sweep = _two_seed_sweep(tmp_path)
    out = tmp_path / "out"
    assert compare.main([str(sweep), "--out", str(out), "--metrics", "gold_win_rat"]) == 2
    err = capsys.readouterr().err
    assert "unknown --metrics metric(s): gold_win_rat" in err
    assert "available: gold_score_policy, gold_win_rate, kl_to_sft" in err
    assert not out.exists()
    assert compare.main([str(sweep), "--out", str(out), "--curves", "kl/reff"]) == 2
    err = capsys.readouterr().err
    assert "unknown --curves metric(s): kl/reff" in err and "gold/score" in err
