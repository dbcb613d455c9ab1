"""Run integrity: non-finite guards, resume fingerprints, the run lock, summaries, temporaries,
permissions and write errors.

Runs are in-process (``alignkit.cli.run_stage`` on a composed config) at the smoke budget on a
policy trained for two SFT steps, so the whole file takes well under a minute. Faults are
injected with in-process plugins (a NaN reward row, NaN advantages) and monkeypatched writes
(disk full, a read-only run directory).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from alignkit import hookimpl
from alignkit.engine.checkpoint import CheckpointWriteError, latest_checkpoint, save_checkpoint
from alignkit.engine.guards import NonFiniteError
from alignkit.engine.run_lock import LOCK_FILE, run_guard
from alignkit.io import WriteError, atomic_write_dir, atomic_write_text
from alignkit.plugins import register_local_plugin, unregister_local_plugin
from tests.conftest import REPO

SMOKE = ["experiment=smoke", "logger=none"]
RL = ["stage=rl", *SMOKE, "algorithm=reinforce", "reward=[gold]", "rl.samples_every=0"]


class NanAt:
    """Test plugin: a NaN in the ``target`` hook's output at the chosen ``steps``."""

    target: ClassVar[str] = ""
    steps: ClassVar[set[int]] = set()

    @hookimpl(wrapper=True)
    def reward(self, ctx: Any, batch: Any) -> Any:
        results = yield
        if "reward" in NanAt.target and ctx.step in NanAt.steps:
            results[0]["gold"] = results[0]["gold"].clone()
            results[0]["gold"][0] = float("nan")  # one NaN row, as in the report
        return results

    @hookimpl(wrapper=True)
    def advantage(self, ctx: Any, batch: Any) -> Any:
        batch = yield
        if "advantage" in NanAt.target and ctx.step in NanAt.steps:
            batch.advantages = batch.advantages * float("nan")  # -> NaN loss and gradients
        return batch


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[Any, Any]]:
    from alignkit.cli import registration

    register_local_plugin("nan_at", NanAt)
    yield registration()
    unregister_local_plugin("nan_at")


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("alignkit.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run(
    app: tuple[Any, Any], run_dir: Path, overrides: list[str], edit: Callable | None = None
) -> dict[str, Any]:
    """``alignkit OVERRIDES run_dir=RUN_DIR`` in process; ``edit`` may change the config."""
    from alignkit.cli import run_stage

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    if edit is not None:
        with open_dict(cfg):
            edit(cfg)
    return run_stage(cfg, run_dir, *app)


@pytest.fixture(scope="module")
def policy(app: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft")
    run(app, run_dir, ["stage=sft", *SMOKE, "sft.steps=2", "eval.num_prompts=4"])
    return run_dir / "sft"


def rl(policy: Path, *extra: str) -> list[str]:
    return [*RL, f"model.path={policy}", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


# -- 1. non-finite rewards, losses, gradients -------------------------------------------------


def test_nan_reward_stops_naming_component_and_step_and_keeps_checkpoints(
    app: tuple[Any, Any], policy: Path, tmp_path: Path
) -> None:
    NanAt.target, NanAt.steps = "reward", {2}
    args = rl(policy, "plugins=[nan_at]", "rl.steps=4", "rl.checkpoint_every=1")
    with pytest.raises(NonFiniteError, match=r"reward component 'gold' is not finite at step 2"):
        run(app, tmp_path, args)
    ckpts = sorted(p.name for p in (tmp_path / "rl/checkpoints").glob("step_*"))
    assert ckpts == ["step_000001", "step_000002"]  # nothing pruned, nothing NaN written
    assert all(all_finite(weights(tmp_path / "rl/checkpoints" / c)) for c in ckpts)
    assert latest_checkpoint(tmp_path / "rl").name == "step_000002"
    assert not (tmp_path / "rl/policy").exists()


def test_nonfinite_gradients_skip_the_step_and_stop_after_consecutive_skips(
    app: tuple[Any, Any], policy: Path, tmp_path: Path
) -> None:
    from alignkit.tracking import read_metrics

    NanAt.target, NanAt.steps = "advantage", {1}
    run(app, tmp_path / "once", rl(policy, "plugins=[nan_at]", "rl.steps=3"))
    rows = [r for r in read_metrics(tmp_path / "once/metrics.jsonl") if r["stage"] == "rl"]
    assert [r["guard/skipped_updates"] for r in rows] == [0.0, 1.0, 0.0]
    assert all_finite(weights(tmp_path / "once/rl/policy"))

    NanAt.steps = {1, 2, 3, 4}  # NaN every step from 1: stop at the third in a row
    with pytest.raises(NonFiniteError, match=r"3 consecutive RL steps \(up to step 3"):
        run(app, tmp_path / "always", rl(policy, "plugins=[nan_at]", "rl.steps=6"))
    ckpt = latest_checkpoint(tmp_path / "always/rl")
    assert ckpt is not None and all_finite(weights(ckpt))


def test_a_nonfinite_policy_is_never_checkpointed_nor_pruned_for(tmp_path: Path) -> None:
    ctx = _tiny_ctx(tmp_path)
    save_checkpoint(ctx, 1, {})
    with torch.no_grad():
        next(ctx.policy.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite at step 2"):
        save_checkpoint(ctx, 2, {})
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_000001"]


# -- 4. resume with a changed config; every launch's config kept ------------------------------


def test_resume_refuses_a_changed_config_unless_allowed_and_keeps_each_launch(
    app: tuple[Any, Any], policy: Path, tmp_path: Path
) -> None:
    from alignkit.errors import ConfigError

    run(app, tmp_path, rl(policy, "rl.steps=2"))
    resume = rl(policy, "rl.steps=3", "rl.resume=true", "seed=1", "rl.kl_coef=0.1")
    with pytest.raises(ConfigError) as info:
        run(app, tmp_path, resume)
    message = str(info.value)
    assert "seed: 0 -> 1" in message and "rl.kl_coef: 0.2 -> 0.1" in message
    assert "rl.resume_allow_changes=[rl.kl_coef,seed]" in message
    assert latest_checkpoint(tmp_path / "rl").name == "step_000002"  # nothing continued

    def allow(cfg: Any) -> None:
        with open_dict(cfg.rl):  # until RLConfig declares the key
            cfg.rl.resume_allow_changes = ["seed", "rl.kl_coef"]

    run(app, tmp_path, resume, edit=allow)
    assert latest_checkpoint(tmp_path / "rl").name == "step_000003"
    launches = sorted((tmp_path / "launches").glob("*.yaml"))
    assert len(launches) == 3  # the first launch's config is still there
    assert "seed: 0" in launches[0].read_text() and "seed: 1" in launches[-1].read_text()


# -- 5. one run directory, one process --------------------------------------------------------

HOLDER = (
    "import sys, time; from pathlib import Path; from alignkit.engine.run_lock import acquire; "
    "acquire(Path(sys.argv[1])); print('LOCKED', flush=True); time.sleep(120)"
)


def test_a_second_run_in_a_locked_run_dir_fails_naming_the_holder(
    app: tuple[Any, Any], policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignkit.cli import main

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "LOCKED"
        expected = (
            f"alignkit: error: run directory {tmp_path.resolve()} is in use by another "
            f"alignkit process (pid {holder.pid})"
        )
        assert main([*rl(policy, "rl.steps=1"), f"run_dir={tmp_path}"]) == 2
        assert expected in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The OS dropped the killed holder's lock: the directory is usable again.
    run(app, tmp_path, rl(policy, "rl.steps=1"))
    assert (tmp_path / "rl/policy/config.json").is_file()


# -- 6. summaries kept --------------------------------------------------------------------------


def test_resuming_a_finished_run_keeps_its_summary_and_policy(
    app: tuple[Any, Any], policy: Path, tmp_path: Path
) -> None:
    run(app, tmp_path, rl(policy, "rl.steps=2"))
    first = summary(tmp_path)
    assert "rl_final/reward/total" in first
    for steps in ("2", "1"):  # finished, and below the checkpoint's step
        run(app, tmp_path, rl(policy, f"rl.steps={steps}", "rl.resume=true"))
        assert summary(tmp_path) == first

    # A kill during the final policy save leaves the final checkpoint, no policy folder and
    # the summary unwritten: the resume rebuilds both from the checkpoint.
    expected = weights(tmp_path / "rl/policy")
    shutil.rmtree(tmp_path / "rl/policy")
    (tmp_path / "summary.json").unlink()
    run(app, tmp_path, rl(policy, "rl.steps=2", "rl.resume=true"))
    got = weights(tmp_path / "rl/policy")
    assert all(got[k].equal(expected[k]) for k in expected)
    assert {k: v for k, v in summary(tmp_path).items() if "time/" not in k} == {
        k: v for k, v in first.items() if "time/" not in k
    }


# -- 7. stale temporaries ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed_at_start(tmp_path: Path) -> None:
    ckpts = tmp_path / "rl" / "checkpoints"
    ckpts.mkdir(parents=True)
    dead, alive = _dead_pid(), os.getppid()
    stale = [
        ckpts / f".latest.{dead}.abcd1234.tmp",
        ckpts / ".latest.k2j4h5g6.tmp",  # written before temporaries carried a pid
        tmp_path / "rl" / f".policy.{dead}.x_y9z8w7.tmp",
        ckpts / f".step_000004.{dead}.q1w2e3r4.old",
    ]
    live = ckpts / f".latest.{alive}.zzzz9999.tmp"
    user = tmp_path / ".notes.tmp"  # not a writer's temporary
    for path in [*stale[:2], live, user]:
        path.write_text("x")
    for path in stale[2:]:
        (path / "old").mkdir(parents=True)
    with run_guard(_guard_ctx(tmp_path)):
        assert not any(p.exists() for p in stale)
    assert live.exists() and user.exists()


# -- 14. permissions ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writers_respect_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "summary.json", "{}")
        folder = atomic_write_dir(tmp_path / "policy", lambda d: (d / "w").write_text("w"))
    finally:
        os.umask(old)
    assert text.stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# -- 8. disk full, read-only run directory ------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("basic_ios::clear: iostream error"),
    ],
)
def test_disk_full_during_a_checkpoint_names_the_file_and_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    ctx = _tiny_ctx(tmp_path)
    save_checkpoint(ctx, 1, {})

    def full(*args: Any, **kwargs: Any) -> None:
        raise fault

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(ctx, 2, {})
    cause = "No space left on device (ENOSPC)" if isinstance(fault, OSError) else str(fault)
    assert str(info.value) == (
        f"cannot write checkpoint {tmp_path / 'checkpoints/step_000002'}: {cause}; "
        "the previous checkpoint step_000001 is kept"
    )
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_disk_full_in_a_run_is_one_error_line(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from alignkit.cli import main

    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "checkpoints" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main([*rl(policy, "rl.steps=2"), f"run_dir={tmp_path}"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "alignkit: error" in ln]
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0]
    assert "step_000002: No space left on device (ENOSPC)" in lines[0]


def test_a_read_only_run_dir_is_one_error_naming_the_file(
    app: tuple[Any, Any], policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alignkit.cli import report_error

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        (run_dir / "probe").touch()  # root ignores the mode: fail the run's writes instead
        (run_dir / "probe").unlink()
        real_open = os.open

        def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).startswith(str(run_dir)) and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    except PermissionError:
        pass
    try:
        with pytest.raises(WriteError) as info:
            run(app, run_dir, rl(policy, "rl.steps=1"))
    finally:
        run_dir.chmod(0o700)
    lock = run_dir.resolve() / LOCK_FILE
    assert str(info.value) == f"cannot write the run lock {lock}: Permission denied (EACCES)"
    report_error(info.value)  # the CLI's one line: "alignkit: error: <message>"


# -- helpers ----------------------------------------------------------------------------------


def _tiny_ctx(run_dir: Path) -> Any:
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignkit.context import RunContext
    from alignkit.plugins import PluginManager
    from alignkit.registry import ComponentRegistry
    from alignkit.tracking import Tracker

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    return RunContext(
        cfg=OmegaConf.create({"rl": {"keep_checkpoints": 2}}),
        run_dir=run_dir,
        plugins=PluginManager(installed={}),
        registry=ComponentRegistry(),
        tracker=Tracker(run_dir, enabled=False),
        policy=GPT2LMHeadModel(config),
    )


def _guard_ctx(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    backend = SimpleNamespace(distributed=False)
    return SimpleNamespace(
        run_dir=run_dir, cfg=OmegaConf.create({"seed": 0}), backend=backend, is_main_process=True
    )
