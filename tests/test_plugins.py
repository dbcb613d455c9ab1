"""Plugin discovery, activation, validation, tracing and error reporting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignkit import hookimpl
from alignkit.errors import HookError, PluginError
from alignkit.plugins import PluginInfo, PluginManager, describe, discover
from tests.conftest import REPO, SMOKE, cli_env, run_cli

TESTS = str(REPO / "tests")
PROBE_PKG = REPO / "tests" / "fixtures" / "alignkit-probe"


def _info(name: str, obj: object) -> PluginInfo:
    return PluginInfo(name=name, source="test", target=name, obj=obj)


class _Algo:
    """A minimal plugin object answering the three firstresult phase hooks."""

    @hookimpl
    def rollout(self, ctx, records):  # type: ignore[no-untyped-def]
        return "rollout"

    @hookimpl
    def advantage(self, ctx, batch):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("boom")

    @hookimpl
    def update(self, ctx, batch):  # type: ignore[no-untyped-def]
        return {}


def _installed(**plugins: object) -> dict[str, PluginInfo]:
    return {
        "core": _info("core", SimpleNamespace()),
        **{k: _info(k, v) for k, v in plugins.items()},
    }


def test_first_party_plugins_are_discovered_through_entry_points() -> None:
    installed = discover()
    for name in ("core", "reinforce", "gold"):
        assert installed[name].ok, installed[name].error
        assert installed[name].source.startswith("alignkit ")
    assert {"advantage", "update", "register_configs"} <= set(installed["reinforce"].hooks)
    assert "reward" in installed["gold"].hooks


def test_unknown_plugin_error_lists_installed_plugins() -> None:
    pm = PluginManager(installed=_installed(algo=_Algo()))
    with pytest.raises(
        PluginError,
        match=r"unknown plugin 'nope' \(asked for by plugins\); "
        r"installed plugins: algo, core",
    ):
        pm.activate(["nope"], reason={"nope": "plugins"})


def test_hook_error_names_plugin_and_hook() -> None:
    pm = PluginManager(installed=_installed(algo=_Algo()))
    pm.activate(["algo"])
    assert pm.call("rollout", ctx=None, records=[]) == "rollout"
    with pytest.raises(
        HookError, match="plugin 'algo' failed in hook 'advantage': ZeroDivisionError: boom"
    ) as info:
        pm.call("advantage", ctx=None, batch=None)
    assert isinstance(info.value.cause, ZeroDivisionError)


def test_implementation_with_wrong_arguments_is_rejected_at_start_up() -> None:
    class Bad(_Algo):
        @hookimpl
        def update(self, ctx, batch, optimizer):  # type: ignore[no-untyped-def]
            return {}

    pm = PluginManager(installed=_installed(bad=Bad()))
    with pytest.raises(
        PluginError, match=r"(?s)plugin 'bad' violates the hook contract.*optimizer"
    ):
        pm.activate(["bad"])


def test_misspelt_hook_name_is_rejected_at_start_up() -> None:
    class Typo(_Algo):
        @hookimpl
        def rolout(self, ctx, records):  # type: ignore[no-untyped-def]
            return None

    pm = PluginManager(installed=_installed(typo=Typo()))
    with pytest.raises(PluginError, match="rolout"):
        pm.activate(["typo"])


def test_missing_phase_implementation_is_an_error() -> None:
    class RolloutOnly:
        @hookimpl
        def rollout(self, ctx, records):  # type: ignore[no-untyped-def]
            return None

    pm = PluginManager(installed=_installed(half=RolloutOnly()))
    with pytest.raises(PluginError, match="no active plugin implements the 'advantage' hook"):
        pm.activate(["half"])


def test_class_plugins_get_a_fresh_instance_per_manager() -> None:
    class Stateful(_Algo):
        def __init__(self) -> None:
            self.calls = 0

    installed = _installed(st=Stateful)
    a, b = PluginManager(installed=installed), PluginManager(installed=installed)
    a.activate(["st"])
    b.activate(["st"])
    assert a.pm.get_plugin("st") is not b.pm.get_plugin("st")


def test_import_error_is_kept_and_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.setenv("ALIGNKIT_PLUGINS", "broken=broken_plugin")
    installed = discover()
    assert not installed["broken"].ok
    assert "this_module_does_not_exist" in (installed["broken"].error or "")
    row = next(r for r in describe(installed) if r["name"] == "broken")
    assert row["hooks"].startswith("IMPORT ERROR: ModuleNotFoundError")
    pm = PluginManager(installed=installed)
    with pytest.raises(PluginError, match=r"(?s)failed to import:.*this_module_does_not_exist"):
        pm.activate(["broken"])


def test_plugins_command_lists_every_plugin_and_its_hooks() -> None:
    env = cli_env(
        ALIGNKIT_PLUGINS="probe=alignkit_probe,broken=broken_plugin",
        PYTHONPATH=f"{PROBE_PKG}:{TESTS}",
    )
    proc = run_cli(["plugins"], env=env)
    assert proc.returncode == 1  # a broken plugin makes the listing fail loudly
    out = proc.stdout
    for name in ("core", "gold", "reinforce", "probe", "broken"):
        assert name in out
    assert "env ALIGNKIT_PLUGINS" in out and "alignkit 0.1.0" in out
    probe_line = next(line for line in out.splitlines() if "alignkit_probe" in line)
    for hook in ("advantage", "reward", "rollout", "update"):
        assert hook in probe_line
    assert "IMPORT ERROR" in out
    assert "this_module_does_not_exist" in proc.stderr  # full traceback, not swallowed


def _probe_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Load the probe plugin from its source folder through ALIGNKIT_PLUGINS."""
    return cli_env(
        ALIGNKIT_PLUGINS="probe=alignkit_probe",
        PYTHONPATH=f"{PROBE_PKG}:{TESTS}",
        PROBE_LOG=str(tmp_path / "probe.jsonl"),
        **extra,
    )


@pytest.fixture(scope="module")
def installed_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe package really installed (built, with its entry point) into a folder."""
    target = tmp_path_factory.mktemp("site")
    # Build from a copy: an in-tree build would leave metadata beside the source folder.
    source = shutil.copytree(PROBE_PKG, tmp_path_factory.mktemp("src") / "alignkit-probe")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def _installed_env(tmp_path: Path, site: Path, **extra: str) -> dict[str, str]:
    return cli_env(PYTHONPATH=str(site), PROBE_LOG=str(tmp_path / "probe.jsonl"), **extra)


def test_installed_package_is_listed_with_its_distribution(
    installed_probe: Path, tmp_path: Path
) -> None:
    proc = run_cli(["plugins"], env=_installed_env(tmp_path, installed_probe))
    assert proc.returncode == 0, proc.stderr
    line = next(row for row in proc.stdout.splitlines() if "alignkit_probe" in row)
    assert "alignkit-probe 0.1.0" in line
    for hook in ("advantage", "reward", "rollout", "update"):
        assert hook in line


@pytest.mark.parametrize("route", ["env", "installed"])
def test_plugin_is_activated_from_the_command_line_and_sees_one_batch_flow(
    sft_run: Path, tmp_path: Path, installed_probe: Path, route: str
) -> None:
    run_dir = tmp_path / "run"
    args = [
        "stage=rl",
        "algorithm=probe",
        "reward=[gold,probe]",
        *SMOKE,
        f"model.path={sft_run / 'sft'}",
        f"run_dir={run_dir}",
    ]
    env = (
        _probe_env(tmp_path, ALIGNKIT_TRACE_HOOKS="1")
        if route == "env"
        else _installed_env(tmp_path, installed_probe, ALIGNKIT_TRACE_HOOKS="1")
    )
    proc = run_cli(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    steps = 3  # experiment=smoke
    assert [c["hook"] for c in calls] == ["rollout", "reward", "advantage", "update"] * steps
    for c in calls:  # the batch made by rollout is the one every later hook received
        assert c["marker"] == f"batch-{c['step']}"
    assert "[alignkit hook] advantage -> probe" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "rl"
    assert (run_dir / "rl" / "policy" / "model.safetensors").is_file()


def test_failing_hook_names_plugin_and_keeps_existing_outputs(
    sft_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    precious = run_dir / "notes.txt"
    precious.write_text("earlier results\n")
    args = [
        "stage=rl",
        "algorithm=probe",
        "reward=[gold,probe]",
        *SMOKE,
        f"model.path={sft_run / 'sft'}",
        f"run_dir={run_dir}",
        "rl.checkpoint_every=1",
    ]
    proc = run_cli(args, env=_probe_env(tmp_path, PROBE_RAISE="update"))
    assert proc.returncode != 0
    assert "plugin 'probe' failed in hook 'update'" in proc.stderr
    assert "RuntimeError: probe was told to fail in update" in proc.stderr
    assert precious.read_text() == "earlier results\n"
    assert not (run_dir / "summary.json").exists()


def test_broken_inactive_plugin_does_not_stop_a_run(tmp_path: Path) -> None:
    class Typo(_Algo):
        @hookimpl
        def rolout(self, ctx, records):  # type: ignore[no-untyped-def]
            return None

    class Failing:
        @hookimpl
        def register_configs(self, config_store):  # type: ignore[no-untyped-def]
            raise KeyError("bad schema")

    from alignkit.registry import ComponentRegistry

    pm = PluginManager(installed=_installed(typo=Typo()))
    pm.run_registration(config_store=None, registry=ComponentRegistry())  # warns, goes on
    assert "violates the hook contract" in (pm.installed["typo"].error or "")
    with pytest.raises(PluginError, match="rolout"):
        pm.activate(["typo"])
    pm = PluginManager(installed=_installed(failing=Failing()))
    with pytest.raises(HookError, match="plugin 'failing' failed in hook 'register_configs'"):
        pm.run_registration(config_store=None, registry=ComponentRegistry())


def test_listed_hooks_are_only_marked_implementations() -> None:
    class Mixed(_Algo):
        def reward(self, ctx, batch):  # type: ignore[no-untyped-def]  # not marked: not a hook
            return None

    installed = _installed(mixed=Mixed())
    from alignkit.plugins import _hook_names

    assert _hook_names(installed["mixed"].obj) == ["advantage", "rollout", "update"]
