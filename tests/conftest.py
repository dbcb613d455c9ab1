"""Shared fixtures: running the ``alignkit`` command and tiny model folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The test environment for a subprocess: no W&B network, no stray plugins."""
    env = dict(os.environ)
    env.pop("ALIGNKIT_PLUGINS", None)
    env.pop("WANDB_API_KEY", None)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    # One thread: tiny models gain little from two, and two threads thrash when another
    # process holds a core.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m alignkit.cli ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "alignkit.cli", *args],
        cwd=cwd or REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SMOKE = ["experiment=smoke", "logger=none"]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``stage=sft`` run at the smoke budget, shared by the tests that need a policy."""
    run_dir = tmp_path_factory.mktemp("sft_run")
    proc = run_cli(["stage=sft", *SMOKE, f"run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def active_plugins(name: str, module: object) -> tuple[object, object]:
    """A plugin manager with the core and ``module`` (as plugin ``name``) active, and a
    registry holding their components, as a run has them."""
    from alignkit_plugins import core

    from alignkit.plugins import PluginInfo, PluginManager
    from alignkit.registry import ComponentRegistry

    installed = {
        "core": PluginInfo(name="core", source="local", target="core", obj=core),
        name: PluginInfo(name=name, source="local", target=name, obj=module),
    }
    manager = PluginManager(installed=installed)
    manager.activate([name])
    registry = ComponentRegistry()
    for plugin in (core, module):
        if hasattr(plugin, "register_components"):
            plugin.register_components(registry=registry)
    return manager, registry
