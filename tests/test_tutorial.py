"""docs/tutorial.md builds a plugin package that installs, is listed, passes its own tests and
really trains with ``alignkit algorithm=<name>``, importing only alignkit's public plugin API.

The package's files are taken from the tutorial's ``<!-- file: path -->`` blocks, installed
with pip into a private folder (``--target``) and put on ``PYTHONPATH`` of the subprocesses,
so the environment running the tests is left unchanged.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from alignkit.tracking import read_metrics

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"
ALIGNKIT = [sys.executable, "-m", "alignkit.cli"]

_MARKER = re.compile(r"^<!-- file: (\S+) -->\s*$")
_FENCE = re.compile(r"^(```+|~~~+)\s*[\w+-]*\s*$")

PUBLIC_MODULES = ("alignkit", "alignkit.rl", "alignkit.rl.ops")
"""The modules of the documented plugin API (docs/plugin-api.md) the tutorial may import from;
only names in their ``__all__``."""


def extract_files(text: str) -> dict[str, str]:
    """Relative path -> content of every fenced block preceded by ``<!-- file: path -->``."""
    lines = text.splitlines()
    files: dict[str, str] = {}
    for i, line in enumerate(lines):
        marker = _MARKER.match(line)
        if marker is None:
            continue
        path = marker.group(1)
        assert not Path(path).is_absolute() and ".." not in Path(path).parts, path
        assert path not in files, f"{path} appears twice in the tutorial"
        start = i + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        fence = _FENCE.match(lines[start].strip()) if start < len(lines) else None
        assert fence is not None, f"<!-- file: {path} --> is not followed by a code block"
        end = next(
            (j for j in range(start + 1, len(lines)) if lines[j].strip() == fence.group(1)),
            None,
        )
        assert end is not None, f"the code block of {path} is not closed"
        files[path] = "\n".join(lines[start + 1 : end]) + "\n"
    return files


@dataclass
class Package:
    root: Path
    """The extracted package folder (the one holding pyproject.toml)."""
    site: Path
    """Where pip installed it (``--target``)."""
    dist_name: str
    plugin: str
    """The entry-point name in the ``alignkit`` group, i.e. the algorithm name."""


def _toml_section(text: str, header: str) -> str:
    match = re.search(rf"^\[{re.escape(header)}\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert match is not None, f"pyproject.toml has no [{header}] table"
    return match.group(1)


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNKIT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["WANDB_MODE"] = "disabled"
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    out, err = proc.stdout[-4000:], proc.stderr[-4000:]
    return f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    files = extract_files(TUTORIAL.read_text(encoding="utf-8"))
    src = tmp_path_factory.mktemp("tutorial_src")
    for rel, content in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(content, encoding="utf-8")
    pyprojects = [rel for rel in files if Path(rel).name == "pyproject.toml"]
    assert len(pyprojects) == 1, f"expected one pyproject.toml in the tutorial, got {pyprojects}"
    root = (src / pyprojects[0]).parent
    pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    dist = re.search(r'^name\s*=\s*"([^"]+)"', _toml_section(pyproject, "project"), re.M)
    assert dist is not None, "pyproject.toml has no project name"
    entry_points = re.findall(
        r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"',
        _toml_section(pyproject, "project.entry-points.alignkit"),
        re.M,
    )
    assert len(entry_points) == 1, f"expected one alignkit entry point, got {entry_points}"

    site = tmp_path_factory.mktemp("tutorial_site")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    pip += ["--no-index", "--disable-pip-version-check", "--target", str(site), str(root)]
    proc = _run(pip, _env(site), cwd=src)
    assert proc.returncode == 0, _explain(proc)
    return Package(root=root, site=site, dist_name=dist.group(1), plugin=entry_points[0][0])


@pytest.fixture(scope="module")
def sft_policy(sft_run: Path) -> Path:
    """An SFT policy folder to start the RL stage from (the suite's shared smoke SFT run)."""
    return sft_run / "sft"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_tutorial_shows_install_listing_and_run(package: Package) -> None:
    text = TUTORIAL.read_text(encoding="utf-8")
    assert f"pip install -e ./{package.root.name}" in text
    assert "alignkit plugins" in text
    assert f"alignkit algorithm={package.plugin} experiment=smoke" in text


def _table_rows(stdout: str) -> list[list[str]]:
    """Cells of every row of the rich tables in ``stdout``; a wrapped row is joined back."""
    rows: list[list[str]] = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        if not cells:
            continue
        if cells[0] == "" and rows and len(rows[-1]) == len(cells):  # a wrapped row goes on
            rows[-1] = [" ".join(filter(None, pair)) for pair in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


def test_alignkit_plugins_lists_the_plugin(package: Package) -> None:
    proc = _run([*ALIGNKIT, "plugins"], _env(package.site), cwd=package.site)
    assert proc.returncode == 0, _explain(proc)
    rows = _table_rows(proc.stdout)
    matching = [row for row in rows if len(row) == 4 and row[0] == package.plugin]
    assert len(matching) == 1, _explain(proc)
    _, source, _, hooks = matching[0]
    dist, _, version = source.rpartition(" ")
    assert _normalise(dist) == _normalise(package.dist_name), source
    assert version == "0.1.0", source
    expected = {"register_configs", "register_components", "algorithm_needs", "update"}
    assert set(hooks.split(", ")) == expected, hooks
    assert "IMPORT ERROR" not in proc.stdout
    # The registered components table shows the estimator and the plugin that registered it.
    estimators = [row[1] for row in rows if len(row) == 2 and row[0] == "advantage"]
    assert len(estimators) == 1, _explain(proc)
    assert f"{package.plugin} ({package.plugin})" in estimators[0].split(", "), estimators


def private_imports(source: str, filename: str = "<doc>") -> tuple[list[str], set[str]]:
    """What ``source`` imports from alignkit outside the public API (one line each), and the
    public names it imports (``module.name``)."""
    problems: list[str] = []
    public_names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if _is_alignkit(a.name)]
        elif isinstance(node, ast.ImportFrom) and _is_alignkit(node.module):
            if node.module not in PUBLIC_MODULES:
                problems.append(f"from {node.module} import ...")
                continue
            public = set(importlib.import_module(node.module).__all__)
            for alias in node.names:
                if alias.name in public:
                    public_names.add(f"{node.module}.{alias.name}")
                else:
                    problems.append(f"{node.module}.{alias.name} (not in its __all__)")
    return problems, public_names


def _is_alignkit(module: str | None) -> bool:
    return (module or "").split(".")[0] == "alignkit"


def test_the_package_imports_only_the_public_plugin_api() -> None:
    files = extract_files(TUTORIAL.read_text(encoding="utf-8"))
    modules = [rel for rel in files if rel.endswith(".py")]
    assert modules, "the tutorial has no Python files"
    imported: set[str] = set()
    for rel in modules:
        problems, names = private_imports(files[rel], rel)
        assert not problems, f"{rel} imports outside {PUBLIC_MODULES}: {problems}"
        imported |= names
    # The tutorial shows the API it is about.
    assert {"alignkit.AlgorithmNeeds", "alignkit.rl.run_update"} <= imported, imported


def test_the_import_check_catches_private_imports() -> None:
    source = "import alignkit.models\nfrom alignkit.config import store_algorithm\n"
    source += "from alignkit.rl import run_update, DataParallel\nimport torch\n"
    problems, names = private_imports(source)
    assert problems == [
        "import alignkit.models",
        "from alignkit.config import ...",
        "alignkit.rl.DataParallel (not in its __all__)",
    ]
    assert names == {"alignkit.rl.run_update"}


def test_the_plugin_package_tests_pass(package: Package) -> None:
    # Run from the install folder so that the tests import the installed module.
    tests = str(package.root / "tests")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests]
    proc = _run(args, _env(package.site), cwd=package.site)
    assert proc.returncode == 0, _explain(proc)
    assert re.search(r"\b\d+ passed\b", proc.stdout), _explain(proc)


def test_rl_run_uses_the_plugin(package: Package, sft_policy: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # No rl.kl_coef=0 here: the plugin declares kl_in="none", so the run must build no
    # reference policy even with the default kl_coef.
    args = [
        f"algorithm={package.plugin}",
        "experiment=smoke",
        "stage=rl",
        "logger=none",
        "reward=[gold]",
        f"model.path={sft_policy}",
        f"run_dir={run_dir}",
    ]
    env = {**_env(package.site), "ALIGNKIT_TRACE_HOOKS": "1"}
    proc = _run([*ALIGNKIT, *args], env, cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert (run_dir / "summary.json").is_file()
    trace = proc.stderr.splitlines()
    steps = [line for line in trace if line.startswith("[alignkit hook] rollout -> ")]
    assert steps, f"no rollout call was traced\n{_explain(proc)}"
    # The core's advantage hook runs the plugin's registered estimator ...
    calls = [line for line in trace if line.startswith("[alignkit hook] advantage -> ")]
    assert calls == ["[alignkit hook] advantage -> core"] * len(steps), calls
    # ... and the plugin's update is called first, so its result wins.
    calls = [line for line in trace if line.startswith("[alignkit hook] update -> ")]
    first = [line.split(" -> ", 1)[1].split(", ")[0] for line in calls]
    assert first == [package.plugin] * len(steps), calls
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]
    assert len(rows) == len(steps)
    for row in rows:
        keys = {"adv/abs_mean", "update/rows", "lr", "loss/policy"}
        keys |= {f"{package.plugin}/rows_chosen", f"{package.plugin}/groups_used"}
        assert keys <= set(row), keys - set(row)
        assert "time/rollout/ref" not in row and row["kl/ref"] == 0.0, row
    assert (run_dir / "rl" / "policy" / "config.json").is_file()
