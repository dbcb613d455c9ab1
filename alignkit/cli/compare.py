"""``alignkit compare``: learning curves and final metrics of a sweep, across seeds.

Reads only the local files every run writes (``metrics.jsonl``, ``summary.json`` and Hydra's
``.hydra/overrides.yaml``), so it works offline and without a W&B account::

    alignkit compare multirun/2026-01-01/12-00-00 [--out DIR] [--metrics KEY ...]
    alignkit compare runs/a runs/b runs/c

Runs are grouped into *configurations* by their overrides minus the seed (``--ignore``), so
``alignkit -m algorithm=ppo,grpo seed=0,1,2`` gives two configurations of three runs each.
Every number is reported as the mean across a configuration's runs with a 95% percentile
bootstrap interval (``scipy.stats.bootstrap``, seeded), clipped to the metric's range
(:data:`METRIC_RANGES`: a score stays in [0, 1], a length non-negative). With the 2-5 seeds a
sweep can afford, the interval shows the seeds' spread rather than a calibrated 95%, so every
seed is drawn too. A configuration with one run has no interval. ``--metrics`` or ``--curves``
naming a metric that no run has is an error that lists the available ones.

Written to ``--out`` (default ``<sweep dir>/compare``):

* ``curves.png``: gold score, the RL reward (titled after its components: learned, or the gold
  oracle under ``reward=[gold]``), KL to the reference and response length against the RL
  step: per configuration a thick mean line, a 95% band and a thin line per seed;
* ``final_metrics.png``: the final metrics as bars (configurations named on the axis) with
  95% CI error bars and one dot per seed;
* ``report.html``: one self-contained page (both images embedded, the table as HTML);
* ``compare.json``: the plotted series and the table, for scripts and tests.

The table is also printed on the console.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

PROG = "alignkit compare"

CURVES: dict[str, str] = {
    "gold/score": "gold score",
    "reward/total": "RL reward",  # retitled after its components: curve_title
    "kl/ref": "KL to reference",
    "response/length": "response length (tokens)",
}
"""Default learning-curve metrics (``metrics.jsonl`` keys) and their axis titles."""

FINAL_METRICS: tuple[str, ...] = (
    "gold_win_rate",
    "gold_score_policy",
    "gold_score_sft",
    "kl_to_sft",
)
"""Default table metrics: the gold evaluation that ``stage=pipeline`` and ``stage=eval`` write."""

RL_FINAL_METRICS: tuple[str, ...] = (
    "rl_final/gold/score",
    "rl_final/reward/total",
    "rl_final/kl/ref",
    "rl_final/response/length",
)
"""Table metrics used when no run has the gold evaluation (e.g. ``stage=rl`` sweeps)."""

IGNORED_KEYS: tuple[str, ...] = ("seed",)
"""Override keys that do not define a configuration: runs differing only here are repeats."""

CI_METHOD = (
    "95% percentile-bootstrap interval of the mean across runs (seeds), clipped to the "
    "metric's range"
)

# Folders inside a run or a sweep that never hold runs of their own.
_SKIP_DIRS = {"wandb", ".hydra", ".submitit", "__pycache__"}
# A comma that starts a new ``key=value`` override (values may contain commas: ``a=[1,2]``).
_OVERRIDE_SPLIT = re.compile(r",(?=[+~]*[\w.@/-]+=)")
_JOB_PREFIX = re.compile(r"^\d+_")


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------

UNBOUNDED: tuple[float, float] = (-math.inf, math.inf)

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "gold/score": (0.0, 1.0),
    "response/length": (0.0, math.inf),
    "gold_win_rate": (0.0, 1.0),
    "gold_score_policy": (0.0, 1.0),
    "gold_score_sft": (0.0, 1.0),
    "win_rate": (0.0, 1.0),
    "rl_final/gold/score": (0.0, 1.0),
    "rl_final/response/length": (0.0, math.inf),
}
"""The values a metric can take; its interval is clipped to them (KL and rewards: unbounded)."""

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the same runs always give the same interval


@functools.cache
def learned_rewards() -> frozenset[str]:
    """Reward components that are trained reward models (the rest are oracles, rules or
    judges): the installed plugins registered as ``learned_reward``."""
    from alignkit.cli import registration

    return frozenset(registration()[1].names("learned_reward"))


def metric_range(metric: str) -> tuple[float, float]:
    """``[low, high]`` that ``metric`` lives in: known metrics and their ``*/length`` kin."""
    if metric in METRIC_RANGES:
        return METRIC_RANGES[metric]
    if metric.endswith(("win_rate", "/gold/score")):
        return (0.0, 1.0)
    if metric.endswith("/length"):
        return (0.0, math.inf)
    return UNBOUNDED


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with its 95% confidence interval ``[low, high]`` (asymmetric)."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready: NaN (no value) becomes null."""
        return {
            "mean": _finite_or_none(self.mean),
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
            "n": self.n,
        }


def mean_ci(values: Iterable[float], bounds: tuple[float, float] = UNBOUNDED) -> Estimate:
    """Mean and 95% percentile-bootstrap interval of the finite ``values``, clipped to ``bounds``.

    Why the bootstrap: with the 2-5 seeds a sweep can afford, a Student-t interval is wider
    than the data and ignores the metric's range (two seeds of a [0, 1] score gave
    -1.25..1.9). The percentile bootstrap stays inside the observed values; with so few seeds
    it is a measure of spread rather than a calibrated 95% interval, and the report says so.
    One value, or equal values, gives a zero-width interval; none gives NaN.
    """
    xs = [float(v) for v in values if math.isfinite(float(v))]
    if not xs:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if min(xs) == max(xs):
        return Estimate(mean, mean, mean, len(xs))
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.asarray(xs),),
        np.mean,
        confidence_level=0.95,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    lo, hi = bounds
    low = min(max(float(result.confidence_interval.low), lo), mean)
    high = max(min(float(result.confidence_interval.high), hi), mean)
    return Estimate(mean, low, high, len(xs))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _as_float(value: Any) -> float | None:
    """A metric value as a float: numbers, and the strings the tracker writes for NaN/inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# sweep folder names
# ---------------------------------------------------------------------------------------------

SUBDIR_RESOLVER = "alignkit.sweep_subdir"
"""The resolver that ``hydra.sweep.subdir`` (``conf/config.yaml``) names job folders with."""

_SUBDIR_ITEM_SEP = "+"
# Between two overrides: before ``key=`` or a bare deletion ``~key`` (Hydra's own separator).
_SUBDIR_SPLIT = re.compile(r",(?=[+~]*[\w.@/-]+=|~[\w.@/-]+(?:,|$))")
_SUBDIR_KV_SEP = "-"
# Characters that a shell and Hydra's override grammar both take unquoted, in a folder name.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_BRACKETS = re.compile(r"[\[\]{}()'\"]+")
_MAX_SUBDIR = 180  # below the usual 255-byte file name limit, with room for the job number


def sweep_subdir_name(override_dirname: str) -> str:
    """A job folder name that pastes into ``run_dir=<path>`` and a shell without quoting.

    ``algorithm=ppo,reward=[gold],seed=0`` (Hydra's ``override_dirname``) becomes
    ``algorithm-ppo+reward-gold+seed-0``: ``=`` -> ``-``, the comma between overrides -> ``+``,
    brackets and quotes dropped, commas inside a value -> ``.``, anything else outside
    ``[A-Za-z0-9_.-]`` -> ``-``. Names are readable, not reversible: two overrides could give
    one name, which is why ``conf/config.yaml`` puts the job number in front.
    """
    items = []
    for override in _SUBDIR_SPLIT.split(override_dirname):
        if not override:
            continue
        key, _, value = override.partition("=")
        key = _UNSAFE.sub("-", key.lstrip("+~"))
        # Not stripped: a leading "-" is a negative number's sign.
        value = _UNSAFE.sub("-", _BRACKETS.sub("", value).replace(",", ".").strip())
        items.append(f"{key}{_SUBDIR_KV_SEP}{value}" if value else key)
    return _SUBDIR_ITEM_SEP.join(items)[:_MAX_SUBDIR].rstrip("+-.") or "job"


def register_sweep_subdir_resolver() -> None:
    """Make ``${alignkit.sweep_subdir:...}`` available to OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(SUBDIR_RESOLVER):
        OmegaConf.register_new_resolver(SUBDIR_RESOLVER, sweep_subdir_name)


class SweepSubdirCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``) that registers the resolver.

    Hydra instantiates callbacks before it names any job folder, in the launching process and,
    unpickled, in every worker of a parallel launcher (joblib, submitit), so the folder name
    resolves wherever the job runs, with no change to how the app is started.
    """

    def __init__(self) -> None:
        register_sweep_subdir_resolver()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        register_sweep_subdir_resolver()


# ---------------------------------------------------------------------------------------------
# finding and reading runs
# ---------------------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """A run directory holds the tracker's ``metrics.jsonl`` or ``summary.json``."""
    return (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()


def find_runs(paths: Sequence[Path]) -> list[tuple[Path, Path]]:
    """``(run_dir, root)`` of every run under ``paths``; ``root`` is the path it was found in.

    A path is either a run directory or a folder (a sweep) searched recursively; the search
    does not enter a run directory (its ``sft/``, ``rl/`` and ``wandb/`` folders hold no runs).
    Job folders can be nested: an override value with a ``/`` (``model.path=runs/sft/sft``)
    puts one inside folders named after the part before it.
    """
    found: dict[Path, Path] = {}
    for root in paths:
        root = Path(root)
        if is_run_dir(root):
            found.setdefault(root.resolve(), root.parent)
            continue
        for run in _walk_runs(root):
            found.setdefault(run.resolve(), root)
    return sorted(found.items(), key=lambda item: _job_sort_key(item[0], item[1]))


def _walk_runs(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            dirnames[:] = []
            yield here
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))


def _job_sort_key(run: Path, root: Path) -> tuple[int, str]:
    """Hydra's job number first (``10_...`` after ``9_...``), then the path."""
    rel = _relative_name(run, root)
    match = re.match(r"^(\d+)_", rel)
    return (int(match.group(1)) if match else sys.maxsize, rel)


def _relative_name(run: Path, root: Path) -> str:
    try:
        return run.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return run.name


def read_overrides(run_dir: Path, root: Path) -> list[str]:
    """The run's command-line overrides: ``.hydra/overrides.yaml``, else its folder name.

    A sweep's job folders are named ``<job num>_<overrides>`` (:func:`sweep_subdir_name`); a
    run started without Hydra's files (or copied without them) is grouped by that name.
    """
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        import yaml

        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        return [str(o) for o in loaded]
    name = _JOB_PREFIX.sub("", _relative_name(run_dir, root))
    if "=" in name:  # folders named before sweep_subdir_name: ``algorithm=ppo,seed=0``
        return [part for part in _OVERRIDE_SPLIT.split(name) if part]
    if _JOB_PREFIX.match(run_dir.name) and _SUBDIR_KV_SEP in name and "/" not in name:
        # ``algorithm-ppo+seed-0``: values come back slugged, enough to group and label runs.
        return [item.replace(_SUBDIR_KV_SEP, "=", 1) for item in name.split(_SUBDIR_ITEM_SEP)]
    return [f"run={name}"]  # not a Hydra job folder: each such run is its own configuration


def override_key(override: str) -> str:
    """``+foo.bar=1`` -> ``foo.bar`` (the key without Hydra's add/delete prefixes)."""
    return override.partition("=")[0].lstrip("+~")


def read_curves(run_dir: Path, stage: str) -> dict[str, dict[int, float]]:
    """``metric -> {step: value}`` of one stage's records in ``metrics.jsonl``.

    A resumed run appends the steps after its checkpoint again: the later record wins, as it
    is the one that the final policy descends from.
    """
    path = run_dir / "metrics.jsonl"
    curves: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return curves
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("stage") != stage or not isinstance(record.get("step"), int):
                continue
            for key, value in record.items():
                number = _as_float(value)
                if key not in ("stage", "step") and number is not None:
                    curves.setdefault(key, {})[int(record["step"])] = number
    return curves


def read_summary(run_dir: Path) -> dict[str, float]:
    """The numeric entries of ``summary.json`` (empty when the run did not finish)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in ((k, _as_float(v)) for k, v in raw.items()) if v is not None}


@dataclass
class Run:
    """One run directory's overrides, curves, summary and reward components."""

    path: Path
    overrides: list[str]
    curves: dict[str, dict[int, float]]
    summary: dict[str, float]
    rewards: tuple[str, ...] = ()
    """The ``reward`` components of its composed config (empty when unknown)."""

    @property
    def name(self) -> str:
        """``seed=<n>`` when the seed was overridden, else the folder name."""
        seed = self.seed()
        return f"seed={seed}" if seed is not None else self.path.name

    def seed(self) -> str | None:
        for o in self.overrides:
            if override_key(o) == "seed":
                return o.partition("=")[2]
        return None


@dataclass
class Configuration:
    """Runs that differ only in ignored keys (the seed): repeats of one configuration."""

    key: tuple[str, ...]
    """The sorted overrides that define it."""
    label: str = ""
    runs: list[Run] = field(default_factory=list)


def read_rewards(run_dir: Path) -> tuple[str, ...]:
    """The reward components of ``.hydra/config.yaml`` (what ``reward/total`` adds up)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return ()
    import yaml

    reward = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("reward")
    return tuple(sorted(reward)) if isinstance(reward, dict) else ()


def load_runs(paths: Sequence[Path], stage: str) -> list[Run]:
    """Every run under ``paths``, read."""
    return [
        Run(
            path=run_dir,
            overrides=read_overrides(run_dir, root),
            curves=read_curves(run_dir, stage),
            summary=read_summary(run_dir),
            rewards=read_rewards(run_dir),
        )
        for run_dir, root in find_runs(paths)
    ]


def group_runs(runs: Sequence[Run], ignore: Iterable[str] = IGNORED_KEYS) -> list[Configuration]:
    """Configurations in order of first appearance, labelled by what tells them apart."""
    ignored = set(ignore)
    groups: dict[tuple[str, ...], Configuration] = {}
    for run in runs:
        key = tuple(
            sorted(
                o
                for o in run.overrides
                if override_key(o) not in ignored
                and not override_key(o).startswith("hydra.")
                and override_key(o) != "run_dir"
            )
        )
        groups.setdefault(key, Configuration(key=key)).runs.append(run)
    configs = list(groups.values())
    _label(configs)
    return configs


def _label(configs: list[Configuration]) -> None:
    """Label each configuration by its overrides that not all configurations share.

    Labels are unique: two configurations with the same varying part would have equal keys.
    """
    common = set.intersection(*(set(c.key) for c in configs)) if configs else set()
    for c in configs:
        varying = [o for o in c.key if o not in common]
        # A single configuration, or the one with only the shared overrides: name it in full.
        c.label = ",".join(varying) or ",".join(c.key) or "(no overrides)"


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


@dataclass
class Series:
    """Mean curve with its 95% band of one configuration and metric, and each run's curve."""

    steps: list[int]
    estimates: list[Estimate]
    runs: dict[str, dict[int, float]] = field(default_factory=dict)
    """Run name (``seed=<n>``) -> ``{step: value}``: the per-seed lines."""

    def to_dict(self) -> dict[str, Any]:
        """Columns ``step``, ``mean``, ``low``, ``high``, ``n``; ``runs``: per-run columns."""
        rows = [e.to_dict() for e in self.estimates]
        columns = ("mean", "low", "high", "n")
        return {
            "step": list(self.steps),
            **{k: [r[k] for r in rows] for k in columns},
            "runs": {
                name: {"step": sorted(c), "value": [c[s] for s in sorted(c)]}
                for name, c in self.runs.items()
            },
        }


def aggregate_curve(runs: Sequence[Run], metric: str) -> Series:
    """Per step, the mean and 95% CI over the runs that logged ``metric`` at that step."""
    per_run = {r.name: r.curves[metric] for r in runs if r.curves.get(metric)}
    steps = sorted(set().union(*per_run.values())) if per_run else []
    bounds = metric_range(metric)
    return Series(
        steps=steps,
        estimates=[mean_ci((c[s] for c in per_run.values() if s in c), bounds) for s in steps],
        runs=per_run,
    )


def aggregate_final(runs: Sequence[Run], metric: str) -> Estimate:
    """Mean and 95% CI of a ``summary.json`` value over the runs that have it."""
    return mean_ci((r.summary[metric] for r in runs if metric in r.summary), metric_range(metric))


class UnknownMetricError(ValueError):
    """Asked-for metrics that no run has; the message lists the ones there are."""

    def __init__(self, option: str, unknown: Sequence[str], available: Iterable[str]) -> None:
        known = ", ".join(sorted(available)) or "(none)"
        super().__init__(f"unknown {option} metric(s): {', '.join(unknown)}; available: {known}")


def check_metrics(option: str, requested: Sequence[str], available: set[str]) -> None:
    """Raise :class:`UnknownMetricError` when a requested metric is in no run at all.

    A metric that only some runs have is fine: the others show "-" (e.g. a crashed seed).
    """
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise UnknownMetricError(option, unknown, available)


def curve_title(metric: str, configs: Sequence[Configuration]) -> str:
    """A panel's title; ``reward/total`` is named after the reward components it adds up.

    Under ``reward=[gold]`` the RL reward is the gold oracle itself, not a learned reward.
    """
    if metric != "reward/total":
        return CURVES.get(metric, metric)
    components = {c for cfg in configs for run in cfg.runs for c in run.rewards}
    names = ", ".join(sorted(components))
    if not components:
        return "total reward"
    if components <= learned_rewards():
        return f"learned reward ({names})"
    if components == {"gold"}:
        return "gold reward (reward=[gold]: the oracle, not learned)"
    return f"total reward ({names})"


def choose_metrics(runs: Sequence[Run], requested: Sequence[str] | None) -> list[str]:
    """The table's metrics: as requested, else the gold evaluation's, else the RL final ones."""
    if requested:
        return list(requested)
    present = set().union(*(r.summary for r in runs)) if runs else set()
    for candidates in (FINAL_METRICS, RL_FINAL_METRICS):
        chosen = [m for m in candidates if m in present]
        if chosen:
            return chosen
    return []


@dataclass
class Comparison:
    """Everything the report shows."""

    configurations: list[Configuration]
    curve_metrics: list[str]
    table_metrics: list[str]
    curves: dict[str, dict[str, Series]]
    """metric -> configuration label -> series."""
    table: dict[str, dict[str, Estimate]]
    """configuration label -> metric -> estimate."""
    sources: list[str]
    stage: str
    curve_titles: dict[str, str] = field(default_factory=dict)
    """metric -> panel title."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ci": CI_METHOD,
            "stage": self.stage,
            "sources": self.sources,
            "configurations": [
                {
                    "label": c.label,
                    "overrides": list(c.key),
                    "runs": [str(r.path) for r in c.runs],
                    "seeds": [r.seed() for r in c.runs],
                }
                for c in self.configurations
            ],
            "curve_metrics": self.curve_metrics,
            "curve_titles": self.curve_titles,
            "table_metrics": self.table_metrics,
            "curves": {
                m: {label: s.to_dict() for label, s in by_cfg.items()}
                for m, by_cfg in self.curves.items()
            },
            "table": {
                label: {m: e.to_dict() for m, e in row.items()} for label, row in self.table.items()
            },
        }


def compare_runs(
    paths: Sequence[Path],
    *,
    curve_metrics: Sequence[str] = tuple(CURVES),
    table_metrics: Sequence[str] | None = None,
    ignore: Iterable[str] = IGNORED_KEYS,
    stage: str = "rl",
    strict_curves: bool = False,
) -> Comparison:
    """Read, group and aggregate the runs under ``paths``.

    Raises :class:`UnknownMetricError` when a requested ``table_metrics`` entry is in no
    ``summary.json`` (or an explicitly requested curve in no ``metrics.jsonl``).
    """
    runs = load_runs(paths, stage)
    configs = group_runs(runs, ignore)
    if runs and table_metrics:
        check_metrics("--metrics", table_metrics, set().union(*(r.summary for r in runs)))
    if runs and strict_curves:
        check_metrics("--curves", curve_metrics, set().union(*(r.curves for r in runs)))
    metrics = choose_metrics(runs, table_metrics)
    curves = {
        m: {c.label: aggregate_curve(c.runs, m) for c in configs if _has_curve(c.runs, m)}
        for m in curve_metrics
    }
    table = {c.label: {m: aggregate_final(c.runs, m) for m in metrics} for c in configs}
    return Comparison(
        configurations=configs,
        curve_metrics=list(curve_metrics),
        table_metrics=metrics,
        curves=curves,
        table=table,
        sources=[str(p) for p in paths],
        stage=stage,
        curve_titles={m: curve_title(m, configs) for m in curve_metrics},
    )


def _has_curve(runs: Sequence[Run], metric: str) -> bool:
    return any(r.curves.get(metric) for r in runs)


# ---------------------------------------------------------------------------------------------
# figures, report, console
# ---------------------------------------------------------------------------------------------


def _colors(comparison: Comparison) -> dict[str, Any]:
    """One color per configuration, the same in every panel and figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(comparison.configurations) <= 10 else "tab20"]
    return {c.label: cmap(i % cmap.N) for i, c in enumerate(comparison.configurations)}


def curves_figure(comparison: Comparison) -> Any:
    """A ``matplotlib.figure.Figure``: one panel per curve metric, one line per configuration.

    Built without pyplot, so nothing global (backend, open figures) is touched.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = comparison.curve_metrics
    ncols = 2 if len(metrics) > 1 else 1
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _colors(comparison)
    for ax, metric in zip(axes, metrics, strict=False):
        _plot_curves(ax, comparison.curves.get(metric, {}), colors)
        ax.set_title(comparison.curve_titles.get(metric) or CURVES.get(metric, metric))
        ax.set_xlabel(f"{comparison.stage.upper()} step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    _legend(fig, comparison, colors)
    fig.suptitle("Mean across seeds (thick), each seed (thin), 95% bootstrap band")
    return fig


def _plot_curves(ax: Any, by_cfg: Mapping[str, Series], colors: Mapping[str, Any]) -> None:
    if not by_cfg:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    for label, series in by_cfg.items():
        # Per-seed lines first, thin, so the mean is drawn on top; a leading "_" keeps them
        # out of legends.
        for name, curve in series.runs.items():
            steps = sorted(curve)
            ax.plot(
                steps,
                [curve[s] for s in steps],
                color=colors[label],
                label=f"_{label} {name}",
                linewidth=0.7,
                alpha=0.45,
            )
        means = [e.mean for e in series.estimates]
        ax.plot(series.steps, means, color=colors[label], label=label, linewidth=1.8)
        if any(e.n > 1 for e in series.estimates):
            ax.fill_between(
                series.steps,
                [e.low for e in series.estimates],
                [e.high for e in series.estimates],
                color=colors[label],
                alpha=0.18,
                linewidth=0,
            )


def _legend(fig: Any, comparison: Comparison, colors: Mapping[str, Any]) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(color=colors[c.label], label=f"{i}. {c.label} (n={len(c.runs)})")
        for i, c in enumerate(comparison.configurations, start=1)
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)))


def final_figure(comparison: Comparison) -> Any:
    """Bars of the table's metrics (one panel each) with 95% CI error bars."""
    from matplotlib.figure import Figure

    metrics = comparison.table_metrics or ["(no metrics)"]
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _colors(comparison)
    configs = comparison.configurations
    labels = [c.label for c in configs]
    for ax, metric in zip(axes, metrics, strict=False):
        estimates = [comparison.table.get(label, {}).get(metric) for label in labels]
        means = [e.mean if e else math.nan for e in estimates]
        # The bootstrap interval is asymmetric: separate lengths below and above the mean.
        below = [e.mean - e.low if e and e.n > 1 else 0.0 for e in estimates]
        above = [e.high - e.mean if e and e.n > 1 else 0.0 for e in estimates]
        x = range(len(labels))
        ax.bar(x, means, yerr=[below, above], color=[colors[la] for la in labels], capsize=4)
        for i, c in enumerate(configs):  # each seed's value as a dot on its bar
            ys = [r.summary[metric] for r in c.runs if metric in r.summary]
            ax.scatter([i] * len(ys), ys, color="black", s=10, zorder=3)
        ax.set_title(metric)
        # Names on the axis, not numbers to look up in the legend.
        ticks = [textwrap.fill(label, 22) for label in labels]
        ax.set_xticks(x, ticks, rotation=30 if len(labels) > 2 else 0, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    _legend(fig, comparison, colors)
    return fig


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _cell(e: Estimate | None) -> str:
    if e is None or e.n == 0:
        return "-"
    if e.n == 1 or e.low == e.high:
        return f"{e.mean:.4g}"
    return f"{e.mean:.4g} [{e.low:.3g}, {e.high:.3g}]"


def html_report(comparison: Comparison, images: Mapping[str, bytes]) -> str:
    """One self-contained page: the table, the configurations and the embedded PNGs."""
    esc = html.escape
    head = "".join(f"<th>{esc(m)}</th>" for m in comparison.table_metrics)
    rows = []
    for i, c in enumerate(comparison.configurations, start=1):
        cells = "".join(
            f"<td>{esc(_cell(comparison.table[c.label].get(m)))}</td>"
            for m in comparison.table_metrics
        )
        rows.append(f"<tr><td>{i}</td><td>{esc(c.label)}</td><td>{len(c.runs)}</td>{cells}</tr>")
    configs = "".join(
        f"<li><b>{i}. {esc(c.label)}</b>: <code>{esc(' '.join(c.key))}</code><br>"
        + "<br>".join(f"<code>{esc(str(r.path))}</code>" for r in c.runs)
        + "</li>"
        for i, c in enumerate(comparison.configurations, start=1)
    )
    figures = "".join(
        f'<h2>{esc(title)}</h2><img alt="{esc(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
        for title, data in images.items()
    )
    n_runs = sum(len(c.runs) for c in comparison.configurations)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>alignkit comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:nth-child(2), th:nth-child(2) {{ text-align: left; }}
img {{ max-width: 100%; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>alignkit comparison</h1>
<p>{n_runs} runs in {len(comparison.configurations)} configurations from
<code>{esc(", ".join(comparison.sources))}</code>.</p>
<h2>Final metrics</h2>
<table><tr><th>#</th><th>configuration</th><th>runs</th>{head}</tr>
{"".join(rows)}</table>
<p class="note">Mean [low, high] of the {esc(CI_METHOD)}; one run: the value alone. With
fewer than about five seeds the interval shows the seeds' spread, not a calibrated 95%.</p>
{figures}
<h2>Configurations</h2><ol class="note" style="list-style: none">{configs}</ol>
</body></html>
"""


def console_table(comparison: Comparison) -> Any:
    """A rich table of the final metrics: mean [95% CI] per configuration."""
    from rich.table import Table

    table = Table(title=f"alignkit compare ({CI_METHOD})")
    table.add_column("#", justify="right")
    table.add_column("configuration", overflow="fold")
    table.add_column("runs", justify="right")
    for m in comparison.table_metrics:
        # Fold rather than cut long names such as rl_final/response/length.
        table.add_column(m, justify="right", overflow="fold")
    for i, c in enumerate(comparison.configurations, start=1):
        row = comparison.table[c.label]
        table.add_row(
            str(i),
            c.label,
            str(len(c.runs)),
            *(_cell(row.get(m)) for m in comparison.table_metrics),
        )
    return table


def write_report(comparison: Comparison, out: Path, dpi: int = 100) -> dict[str, Path]:
    """Write the PNGs, the HTML report and the JSON sidecar into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "Learning curves": png_bytes(curves_figure(comparison), dpi),
        "Final metrics": png_bytes(final_figure(comparison), dpi),
    }
    paths = {
        "curves": out / "curves.png",
        "final": out / "final_metrics.png",
        "html": out / "report.html",
        "json": out / "compare.json",
    }
    paths["curves"].write_bytes(images["Learning curves"])
    paths["final"].write_bytes(images["Final metrics"])
    paths["html"].write_text(html_report(comparison, images), encoding="utf-8")
    paths["json"].write_text(json.dumps(comparison.to_dict(), indent=1) + "\n", encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compare the runs of a sweep (or a list of run directories): learning "
        f"curves and final metrics per configuration, with the {CI_METHOD}.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="sweep directories or run dirs")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: <sweep dir>/compare or ./compare)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="KEY",
        help="summary.json keys for the table (default: "
        f"{', '.join(FINAL_METRICS)}; else {', '.join(RL_FINAL_METRICS)})",
    )
    parser.add_argument(
        "--curves",
        nargs="+",
        metavar="KEY",
        help=f"metrics.jsonl keys to plot (default: {', '.join(CURVES)})",
    )
    parser.add_argument(
        "--ignore",
        nargs="+",
        metavar="KEY",
        default=list(IGNORED_KEYS),
        help="override keys that do not define a configuration (default: seed)",
    )
    parser.add_argument("--stage", default="rl", help="stage whose curves to plot (default: rl)")
    parser.add_argument(
        "--dpi", type=int, default=100, help="resolution of the PNGs (default: 100)"
    )
    return parser


def default_out(paths: Sequence[Path]) -> Path:
    """A single sweep folder gets ``<it>/compare``; anything else ``./compare``."""
    if len(paths) == 1 and paths[0].is_dir() and not is_run_dir(paths[0]):
        return paths[0] / "compare"
    return Path("compare")


def main(argv: Sequence[str] | None = None) -> int:
    """``alignkit compare``; returns the exit status (2: no runs, a bad path, unknown metrics)."""
    from rich.console import Console

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a usage error that argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    if importlib.util.find_spec("scipy") is None:  # the bootstrap intervals need it
        print(
            f"{PROG}: error: needs scipy (a dependency of alignkit): pip install scipy",
            file=sys.stderr,
        )
        return 2
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"{PROG}: error: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        comparison = compare_runs(
            args.paths,
            curve_metrics=args.curves or list(CURVES),
            table_metrics=args.metrics,
            ignore=args.ignore,
            stage=args.stage,
            strict_curves=args.curves is not None,  # the defaults may be absent (an SFT run)
        )
    except UnknownMetricError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not comparison.configurations:
        where = ", ".join(str(p) for p in args.paths)
        print(
            f"{PROG}: error: no runs (metrics.jsonl or summary.json) under {where}", file=sys.stderr
        )
        return 2
    out = args.out or default_out(args.paths)
    written = write_report(comparison, out, dpi=args.dpi)
    # A terminal's own width; a file or pipe gets wide lines rather than folded numbers.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(console_table(comparison))
    console.print(f"report: {written['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
