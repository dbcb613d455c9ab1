"""Reliability of the command line and run tracking: torn metrics appends, secrets kept out of
Hydra's files and W&B, progress off a terminal, alignkit's own help, W&B resume, unknown keys.

In-process and at tiny budgets; imports sit inside the tests so each fails on its own.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from tests.conftest import SMOKE

TORN = '{"stage": "rl", "step": 2, "loss": 0.1'


def _write_metrics(path: Path, *lines: str, newline_at_end: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""), encoding="utf-8")


def _record(step: int) -> str:
    return json.dumps({"stage": "rl", "step": step, "loss": 1.0 / (step + 1)})


# -- item 2: torn last line of metrics.jsonl -------------------------------------------------


def test_torn_last_metrics_line_is_skipped_with_a_warning_and_resume_rewinds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from alignkit.tracking import Tracker, read_metrics

    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, _record(0), _record(1), TORN, newline_at_end=False)
    with caplog.at_level(logging.WARNING):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1]
    assert f"{path}:3" in caplog.text and "torn" in caplog.text

    # What rl.resume=true does: a new tracker in the run directory rewinds to the checkpoint,
    # and appends after it go on a line of their own, not glued to the torn one.
    tracker = Tracker(tmp_path, wandb_cfg={"mode": "disabled"})
    assert tracker.rewind("rl", 1) == 1
    tracker.log({"loss": 0.5}, step=1, stage="rl")
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    assert path.read_text(encoding="utf-8").endswith("\n")


def test_complete_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    from alignkit.tracking import Tracker, read_metrics

    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, _record(0), _record(1), newline_at_end=False)
    Tracker(tmp_path, wandb_cfg={"mode": "disabled"}).log({"loss": 0.2}, step=2, stage="rl")
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]


def test_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    from alignkit.errors import DataError
    from alignkit.tracking import read_metrics

    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, _record(0), TORN, _record(3))
    with pytest.raises(DataError, match=rf"{path}:2: not a JSON record"):
        read_metrics(path)


# -- item 12: a pasted key never reaches Hydra's files ---------------------------------------


def _main(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> int:
    from alignkit.cli import main

    monkeypatch.setattr(sys, "argv", ["alignkit"])  # main() rewrites it for Hydra
    monkeypatch.setenv("WANDB_MODE", "offline")
    return main(args)


@pytest.mark.parametrize(
    "override",
    [
        "eval.judge.api_key_env=sk-live-0123456789abcdef",
        "+reward.critique.judge.api_key_env='sk-live-0123456789abcdef'",
    ],
)
def test_pasted_api_key_is_refused_before_hydra_writes_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    override: str,
) -> None:
    run_dir = tmp_path / "run"
    args = ["stage=eval", "eval.judge.backend=http", override, f"run_dir={run_dir}", *SMOKE]
    assert _main(monkeypatch, args) == 2
    err = capsys.readouterr().err
    assert "api_key_env must be the NAME of an environment variable" in err
    assert "sk-live" not in err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if "sk-live" in p.read_text(errors="replace")]
    assert not (run_dir / ".hydra").exists()


def test_api_key_env_names_and_null_pass_the_check() -> None:
    from alignkit.cli import check_secret_overrides

    check_secret_overrides(["eval.judge.api_key_env=OPENAI_API_KEY", "seed=1"])
    check_secret_overrides(["reward.critique.judge.api_key_env=null"])


# -- item 13: secrets redacted by key name, not substring ------------------------------------


def test_redaction_keeps_token_budgets_and_hides_secrets() -> None:
    from alignkit.tracking import REDACTED, redact_argv, redact_secrets

    cfg = {
        "rl": {"max_new_tokens": 32},
        "eval": {"max_new_tokens": 16, "judge": {"api_key_env": "OPENAI_API_KEY"}},
        "feedback": {"max_new_tokens": 24},
        "task": {"max_prompt_tokens": 32},
        "extra": {"api_key": "sk-1", "token": "t", "hf_token": "h", "password": "p", "secret": "s"},
    }
    out = redact_secrets(cfg)
    assert out["rl"]["max_new_tokens"] == 32 and out["feedback"]["max_new_tokens"] == 24
    assert out["eval"]["max_new_tokens"] == 16 and out["task"]["max_prompt_tokens"] == 32
    assert out["eval"]["judge"]["api_key_env"] == "OPENAI_API_KEY"  # a name, not a secret
    assert set(out["extra"].values()) == {REDACTED}
    argv = redact_argv(["rl.max_new_tokens=8", "+extra.api_key=sk-2", "+extra.hf_token=x"])
    assert argv == [
        "rl.max_new_tokens=8",
        f"+extra.api_key={REDACTED}",
        f"+extra.hf_token={REDACTED}",
    ]


# -- item 15: progress off a terminal --------------------------------------------------------


def test_plain_progress_lines_are_logged_when_output_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from alignkit import progress

    monkeypatch.delenv(progress.ENV_MODE, raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # SLURM / nohup: a file
    bar = progress.progress_bar()
    assert isinstance(bar, progress.LogProgress)
    with caplog.at_level(logging.INFO, logger="alignkit.progress"), bar:
        task = bar.add_task("rl", total=20, info="")
        for _ in range(20):
            bar.update(task, advance=1, info="reward 0.500")
    lines = [r.getMessage() for r in caplog.records if r.name == "alignkit.progress"]
    assert 10 <= len(lines) <= 20  # every tenth of the loop, not every step
    assert lines[-1].startswith("rl: 20/20 (100%) elapsed 0:00:00")
    assert lines[-1].endswith("reward 0.500")


def test_plain_progress_is_logged_by_rank_0_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from alignkit import progress

    monkeypatch.setattr(progress.console, "quiet", True)  # as the CLI sets it on rank 1
    bar = progress.LogProgress()
    with caplog.at_level(logging.INFO, logger="alignkit.progress"), bar:
        task = bar.add_task("rl", total=4, info="")
        for _ in range(4):
            bar.update(task, advance=1)
    assert [r for r in caplog.records if r.name == "alignkit.progress"] == []


def test_messages_off_a_terminal_never_wrap_paths() -> None:
    from alignkit.tracking import make_console

    out = io.StringIO()
    path = "/scratch/" + "/".join(f"very_long_directory_name_{i}" for i in range(8))
    make_console(file=out).print(f"RL policy saved to {path}")
    assert out.getvalue() == f"RL policy saved to {path}\n"


def test_feedback_problems_are_listed_once(capsys: pytest.CaptureFixture[str]) -> None:
    from alignkit.progress import print_report

    lines = ["8 feedback records (8 pairwise)", "2 empty responses: f.jsonl:3; f.jsonl:7"]
    print_report("feedback", lines)  # the feedback stage, on the records it wrote
    print_report("reward_model data", lines)  # the reward-model stage, reading them back
    err = capsys.readouterr().err
    assert err.count("f.jsonl:3") == 1
    assert "reward_model data: 2 empty responses (listed above)" in err
    assert err.count("8 feedback records") == 2


def test_eval_and_feedback_sampling_log_progress_with_unchanged_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import AlignkitConfig
    from alignkit.data.prompts import prompt_format
    from alignkit.evaluation import sample_policy
    from alignkit.models.tiny import TinyArchSpec, build_tiny_causal_lm
    from alignkit.stages import evaluate, feedback
    from alignkit.tasks.assist import AssistTask

    monkeypatch.setenv("ALIGNKIT_PROGRESS", "plain")
    task = AssistTask(max_operand=2)
    spec = TinyArchSpec(vocab_size=320, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    folder = build_tiny_causal_lm(tmp_path / "m", task.corpus(), spec)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    cfg = OmegaConf.structured(AlignkitConfig)
    cfg.eval.batch_size = cfg.feedback.batch_size = 3
    cfg.eval.max_new_tokens = cfg.feedback.max_new_tokens = 6
    cfg.feedback.samples_per_prompt = 2
    ctx = SimpleNamespace(cfg=cfg, task=task)
    records = task.eval_prompts()[:11]

    def one_call(recs: list[object], seed: int, new_tokens: int) -> object:
        return sample_policy(
            model,
            tok,
            task,
            recs,
            max_new_tokens=new_tokens,
            batch_size=3,
            max_prompt_tokens=int(cfg.task.max_prompt_tokens),
            generator=torch.Generator().manual_seed(seed),
            fmt=prompt_format(cfg, tok, model),
        )

    with caplog.at_level(logging.INFO, logger="alignkit.progress"):
        sliced = evaluate._sample(ctx, model, tok, records, seed_offset=11)  # type: ignore[arg-type]
        groups = feedback.sample_responses(ctx, model, tok, records)  # type: ignore[arg-type]
    whole = one_call(records, int(cfg.seed) + 11, 6)
    assert sliced.responses == whole.responses
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(sliced, name), getattr(whole, name)), name
    pairs = one_call([r for r in records for _ in range(2)], int(cfg.feedback.seed), 6).responses
    assert groups == [list(dict.fromkeys(pairs[2 * i : 2 * i + 2])) for i in range(11)]
    lines = [r.getMessage() for r in caplog.records if r.name == "alignkit.progress"]
    assert "eval sampling (policy): 11/11 (100%)" in "\n".join(lines)
    assert "feedback sampling: 22/22 (100%)" in "\n".join(lines)


# -- item 19: alignkit's own --help and --version --------------------------------------------


def test_help_is_alignkits_own_and_short(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(monkeypatch, ["--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 50
    for needle in (
        "usage: alignkit",
        "alignkit compare",
        "alignkit export",
        "alignkit plugins",
        "stages (stage=...): ",
        "reward_model",
        "experiment=smoke",
        "--hydra-help",
        "docs:",
    ):
        assert needle in out, needle


def test_version_is_alignkits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignkit.cli import version

    assert _main(monkeypatch, ["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"alignkit {version()}\n" and "Hydra" not in out


# -- item 20: W&B offline resume and sample tables -------------------------------------------


def test_resumed_offline_wandb_run_continues_its_steps_and_pages_one_samples_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    from alignkit.tracking import Tracker
    from tests.wandb_offline import read_wandb_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def job(steps: range) -> None:
        tracker = Tracker(tmp_path, config={"seed": 0}, wandb_cfg={"mode": "offline"})
        for step in steps:  # as the RL engine logs: the step's samples, then its metrics
            tracker.log_table(f"rl_samples_step_{step:06d}", ["step", "text"], [[step, "hi"]])
            tracker.log({"loss": float(step)}, step=step, stage="rl")
        tracker.log_table("rl_samples_step_000009", ["step", "text"], [[9, "last"]])
        tracker.finish()  # commits the open row of that last table

    try:
        job(range(0, 2))
        job(range(2, 4))  # rl.resume=true: the same run directory
    finally:
        wandb.teardown()
    err = capsys.readouterr().err
    assert "wandb sync " in err and str(tmp_path / "wandb" / "offline-run-") in err
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    first, second = (read_wandb_offline_run(f) for f in files)
    assert first["id"] == second["id"]
    steps = [[row["_step"] for row in run["history"]] for run in (first, second)]
    assert steps == [[0, 1, 2], [3, 4, 5]]  # one row per step; no restart at 0
    keys = {k for run in (first, second) for row in run["history"] for k in row}
    assert not [k for k in keys if "samples_step" in k]
    # A table is stored as nested keys under its one key, at the step it belongs to.
    tables = [r for run in (first, second) for r in run["history"] if "rl/samples/_type" in r]
    assert [(row["rl/samples/_type"], row["rl/step"]) for row in tables] == [
        ("table-file", step) for step in (0, 1, 9, 2, 3, 9)
    ]
    assert [row.get("rl/loss") for row in tables] == [0.0, 1.0, None, 2.0, 3.0, None]


# -- item 21: keys no schema declares --------------------------------------------------------


def test_undeclared_plus_key_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["+totally_bogus_key=1", "stage=sft", *SMOKE, "sft.steps=2", f"run_dir={tmp_path}"]
    assert _main(monkeypatch, args) == 2
    err = capsys.readouterr().err
    assert "alignkit: error: totally_bogus_key: no schema" in err and "extra.<key>" in err
    assert not (tmp_path / "sft").exists()


def test_plugin_keys_and_extra_namespace_are_declared() -> None:
    from hydra import compose, initialize_config_module

    from alignkit.cli import registration
    from alignkit.config import undeclared_keys

    registration()
    overrides = [
        "algorithm=grpo",
        "reward=[critique]",
        "+judge=tiny",
        "+extra.note=hello",
        "+extra.nested.k=1",
        "+rl.lrr=1",
        "+reward.critique.judge.bogus=1",
    ]
    with initialize_config_module("alignkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert sorted(undeclared_keys(cfg)) == ["reward.critique.judge.bogus", "rl.lrr"]
