"""Five third-party plugins written on the public plugin API (``docs/plugin-api.md``), installed
as packages and run: GSPO, ReMax, DAPO, offline DPO and a length-penalty reward.

They prove the API is enough: each is small (lines of code counted without blank lines,
comments and docstrings), imports only documented names, and trains through the CLI with no
change to alignkit.
"""

from __future__ import annotations

import ast
import io
import json
import math
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

from alignkit.tracking import read_metrics

from .conftest import SMOKE, cli_env, run_cli

EXTERNAL = Path(__file__).parent / "fixtures" / "external"
LIMITS = {"gspo": 40, "remax": 40, "dapo": 80, "dpo": 80, "length_penalty": 40}
"""Lines of code each plugin may take (the issue's budget)."""
PUBLIC_MODULES = ("alignkit", "alignkit.rl", "alignkit.rl.ops", "alignkit.data")
"""The documented API: a plugin imports names in these modules' ``__all__`` and nothing else
from alignkit."""


def _source(name: str) -> Path:
    return EXTERNAL / f"alignkit-{name.replace('_', '-')}" / f"alignkit_{name}.py"


def lines_of_code(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc_lines.update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
        # An attribute docstring: a string expression after an assignment in a class body.
        if isinstance(node, ast.ClassDef):
            for stmt in node.body[1:]:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    doc_lines.update(range(stmt.lineno, (stmt.end_lineno or 0) + 1))
    code_lines: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip or tok.type == tokenize.ENDMARKER:
            continue
        code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(code_lines - doc_lines)


def test_the_line_counter_skips_docstrings_comments_and_blank_lines() -> None:
    source = '"""Doc\n\nmore."""\n\n# a comment\nx = 1  # trailing\n\n\ndef f(\n    a,\n):\n'
    source += '    """Doc."""\n    return a\n\n\nclass C:\n    y: int = 0\n    """Attr doc."""\n'
    # x = 1 / def f( / a, / ): / return a / class C: / y: int = 0
    assert lines_of_code(source) == 7


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_plugin_is_small(name: str) -> None:
    count = lines_of_code(_source(name).read_text())
    assert count <= LIMITS[name], f"{name}: {count} lines of code, budget {LIMITS[name]}"


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_plugin_imports_only_the_documented_api(name: str) -> None:
    assert_public_imports_only(_source(name).read_text(), name)


def assert_public_imports_only(source: str, name: str) -> None:
    """Every alignkit import of ``source`` is a name in a public module's ``__all__``."""
    import importlib

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("alignkit") for a in node.names), ast.unparse(node)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alignkit"):
            assert node.module in PUBLIC_MODULES, f"{name} imports {node.module}"
            public = set(importlib.import_module(node.module).__all__)
            for alias in node.names:
                assert alias.name in public, f"{name} imports {node.module}.{alias.name}"


def test_gspo_loss_is_the_clipped_sequence_ratio_hand_computed() -> None:
    sys.path.insert(0, str(_source("gspo").parent))
    try:
        from alignkit_gspo import gspo_loss
    finally:
        sys.path.pop(0)
    # row 0: log-ratios [0.2, 0.0] -> s = exp(0.1) = 1.10517, A = 1: clipped at 1 + 0.05
    # row 1: log-ratios [-0.1, pad]  -> s = exp(-0.1) = 0.90484, A = -2: clipped at 1 - 0.05
    logp = torch.tensor([[-1.0, -2.0], [-1.1, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0], [-1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    per_token, clipfrac = gspo_loss(logp, old, adv, mask, clip_eps=0.05, clip_eps_high=0.05)
    s0, s1 = math.exp(0.1), math.exp(-0.1)
    # row 0: max(-1 * 1.10517, -1 * 1.05) = -1.05; row 1: max(2 * 0.90484, 2 * 0.95) = 1.9
    expected = torch.tensor([[-1.05, -1.05], [1.9, 0.0]])
    torch.testing.assert_close(per_token, expected)
    assert clipfrac.item() == pytest.approx(1.0)  # both sequences clipped: no gradient
    per_token, _ = gspo_loss(logp, old, adv, mask, clip_eps=0.5, clip_eps_high=0.5)
    torch.testing.assert_close(per_token[0], torch.tensor([-s0, -s0]))
    torch.testing.assert_close(per_token[1, 0], torch.tensor(2 * s1))
    # d(-s0)/d logp_0t = -s0 / |y_0| on each token of row 0 (the mean of the log-ratios)
    (per_token[0, 0]).backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([-s0 / 2, -s0 / 2]))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five packages really installed (built, with their entry points) into a folder."""
    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("src")
    copies = [str(shutil.copytree(d, sources / d.name)) for d in sorted(EXTERNAL.iterdir())]
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, "--target", str(target), *copies],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def test_the_installed_plugins_are_listed(site: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "plugins"],
        env=cli_env(PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in LIMITS:
        assert f"alignkit-{name.replace('_', '-')} 0.1.0" in proc.stdout, name
    # the registries show what the packages added
    assert "my_gspo (my_gspo)" in proc.stdout.split("policy_loss", 1)[1]
    assert "my_remax (my_remax)" in proc.stdout.split("advantage", 1)[1]


def _rl_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]


@pytest.mark.parametrize(
    ("algorithm", "extra", "keys"),
    [
        ("my_gspo", [], {"loss/policy", "policy/clipfrac", "kl/loss", "kl/ref", "reward/gold"}),
        ("my_remax", [], {"loss/policy", "adv/abs_mean", "reward/gold", "kl/ref"}),
        (
            "my_dapo",
            ["rl.max_new_tokens=8", "algorithm.overlong_buffer=4"],
            {"reward/overlong", "dapo/informative_fraction", "loss/policy", "reward/gold"},
        ),
    ],
)
def test_online_plugins_train_from_the_command_line(
    site: Path, sft_run: Path, tmp_path: Path, algorithm: str, extra: list[str], keys: set[str]
) -> None:
    args = [
        "stage=rl",
        f"algorithm={algorithm}",
        *SMOKE,
        "reward=[gold,length_penalty]",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path}",
        *extra,
    ]
    proc = run_cli(args, env=cli_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rl_rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert keys | {"reward/length_penalty", "gold/score"} <= set(row), keys - set(row)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        # the third-party reward entered the total with its default weight (-0.05)
        total = row["reward/gold"] - 0.05 * row["reward/length_penalty"]
        if algorithm == "my_dapo":
            total += row["reward/overlong"]
        assert row["reward/total"] == pytest.approx(total, abs=1e-5)
    assert (tmp_path / "rl" / "policy" / "model.safetensors").is_file()


def test_offline_dpo_trains_on_preference_data_without_a_reward(site: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from .test_own_data import DATA, _module

    model = _module("make_model").main(DATA, tmp_path / "llama")
    run_dir = tmp_path / "run"
    args = [
        "stage=rl",
        "algorithm=my_dpo",
        "task=data",
        "model=hf",
        f"model.path={model}",
        f"task.preference_data={DATA / 'preferences.jsonl'}",
        "reward=[]",
        "rl.steps=3",
        "rl.prompts_per_step=4",
        "rl.optim.lr=1e-3",
        "logger=none",
        f"run_dir={run_dir}",
    ]
    proc = run_cli(args, env=cli_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rl_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert {"loss/policy", "dpo/accuracy", "dpo/margin", "policy/grad_norm"} <= set(row)
        # Offline: no reward, and the data set is never described as if it were the
        # policy's samples: those statistics come from the engine's probe of the policy.
        assert "reward/total" not in row, row
        assert 0.0 <= row["dpo/accuracy"] <= 1.0
    # rl.probe_every=5: the probe samples the policy at step 0 and at the last step only
    assert ["response/length" in r for r in rows] == [True, False, True]
    # the first step starts from the reference: h = 0 on every pair, the loss is log 2
    assert rows[0]["loss/policy"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-4)
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "rl" / "policy")
    base = AutoModelForCausalLM.from_pretrained(model)
    changed = [
        not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True)
    ]
    assert any(changed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "rl_final/dpo/accuracy" in summary


@pytest.mark.parametrize(("algorithm", "calls"), [("grpo", [8]), ("my_remax", [8, 4])])
def test_a_batch_its_rollout_scored_is_not_scored_again(
    site: Path, sft_run: Path, tmp_path: Path, algorithm: str, calls: list[int]
) -> None:
    """GRPO's batch is scored once, by the engine; ReMax scores its samples and its greedy
    baseline in the rollout (``ctx.score``), and the engine scores nothing more."""
    log = tmp_path / "calls.jsonl"
    args = [
        "stage=rl",
        f"algorithm={algorithm}",
        *SMOKE,
        "rl.prompts_per_step=4",
        "rl.samples_per_prompt=2",
        "reward=[gold,counter]",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path / 'run'}",
    ]
    env = cli_env(
        PYTHONPATH=f"{site}:{Path(__file__).parent}",
        ALIGNKIT_PLUGINS="counter=reward_counter",
        COUNTER_LOG=str(log),
    )
    proc = run_cli(args, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for step in range(3):
        assert [r["rows"] for r in records if r["step"] == step] == calls
