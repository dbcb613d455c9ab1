"""docs/tutorial.md builds a plugin package that installs, is listed, passes its own tests and
really trains with ``alignkit algorithm=<name>``.

The package's files are taken from the tutorial's ``<!-- file: path -->`` blocks, installed
with pip into a private folder (``--target``) and put on ``PYTHONPATH`` of the subprocesses,
so the environment running the tests is left unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"
ALIGNKIT = [sys.executable, "-m", "alignkit.cli"]

_MARKER = re.compile(r"^<!-- file: (\S+) -->\s*$")
_FENCE = re.compile(r"^(```+|~~~+)\s*[\w+-]*\s*$")


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


def test_alignkit_plugins_lists_the_plugin(package: Package) -> None:
    proc = _run([*ALIGNKIT, "plugins"], _env(package.site), cwd=package.site)
    assert proc.returncode == 0, _explain(proc)
    rows = [
        [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        for line in proc.stdout.splitlines()
    ]
    matching = [row for row in rows if row and row[0] == package.plugin]
    assert len(matching) == 1, _explain(proc)
    _, source, _, hooks = matching[0]
    dist, _, version = source.rpartition(" ")
    assert _normalise(dist) == _normalise(package.dist_name), source
    assert version == "0.1.0", source
    assert set(hooks.split(", ")) == {"register_configs", "advantage", "update"}, hooks
    assert "IMPORT ERROR" not in proc.stdout


def test_the_plugin_package_tests_pass(package: Package) -> None:
    # Run from the install folder so that the tests import the installed module.
    tests = str(package.root / "tests")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests]
    proc = _run(args, _env(package.site), cwd=package.site)
    assert proc.returncode == 0, _explain(proc)
    assert re.search(r"\b\d+ passed\b", proc.stdout), _explain(proc)


def test_rl_run_uses_the_plugin(package: Package, sft_policy: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        f"algorithm={package.plugin}",
        "experiment=smoke",
        "stage=rl",
        "logger=none",
        "reward=[gold]",
        "rl.kl_coef=0",
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
    for hook in ("advantage", "update"):
        calls = [line for line in trace if line.startswith(f"[alignkit hook] {hook} -> ")]
        assert calls == [f"[alignkit hook] {hook} -> {package.plugin}"] * len(steps), calls
    assert (run_dir / "rl" / "policy" / "config.json").is_file()
