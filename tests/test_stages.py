"""End-to-end stages through the command line: SFT, RL, eval, the pipeline, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.tracking import read_metrics
from tests.conftest import SMOKE, cli_env, run_cli
from tests.wandb_offline import read_wandb_offline_run


def test_sft_beats_the_untrained_model_and_reloads(sft_run: Path) -> None:
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["stage"] == "sft"
    # The untrained model emits noise that the gold oracle scores ~0.
    assert summary["gold_score_base"] < 0.05
    assert summary["gold_score_sft"] > summary["gold_score_base"] + 0.06
    folder = sft_run / "sft"
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("User: What is 2 plus 3?\nAssistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    assert tok.pad_token_id != tok.eos_token_id
    records = read_metrics(sft_run / "metrics.jsonl")
    assert records and all(r["stage"] == "sft" for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_rl_and_eval_stages_write_their_headline_numbers(sft_run: Path, tmp_path: Path) -> None:
    policy = sft_run / "sft"
    rl_dir = tmp_path / "rl"
    proc = run_cli(
        [
            "stage=rl",
            *SMOKE,
            "algorithm=reinforce",
            "reward=[gold]",
            f"model.path={policy}",
            f"run_dir={rl_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rl_rows = [r for r in read_metrics(rl_dir / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows] == [0, 1, 2]
    for key in ("reward/total", "reward/gold", "loss/policy", "kl/ref", "time/rollout"):
        assert key in rl_rows[0]
    for row in rl_rows:  # the rollout's parts: sampling and the reference forward
        parts = row["time/rollout/generation"], row["time/rollout/ref"]
        assert min(parts) > 0 and sum(parts) <= row["time/rollout"]
        assert row["time/step"] == pytest.approx(
            sum(row[f"time/{p}"] for p in ("rollout", "reward", "advantage", "update"))
        )
    ckpts = rl_dir / "rl" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000003"

    eval_dir = tmp_path / "eval"
    proc = run_cli(
        [
            "stage=eval",
            *SMOKE,
            f"eval.policy={rl_dir / 'rl' / 'policy'}",
            f"eval.baseline={policy}",
            f"run_dir={eval_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((eval_dir / "summary.json").read_text())
    for key in ("gold_win_rate", "gold_score_sft", "gold_score_policy", "kl_to_sft"):
        assert isinstance(summary[key], float)
    assert 0.0 <= summary["gold_win_rate"] <= 1.0
    table = json.loads((eval_dir / "eval_samples.json").read_text())
    assert table["columns"][0] == "prompt" and len(table["rows"]) == 6


def test_eval_of_a_policy_against_itself_is_a_tie_with_zero_kl(
    sft_run: Path, tmp_path: Path
) -> None:
    policy = sft_run / "sft"
    proc = run_cli(
        [
            "stage=eval",
            *SMOKE,
            "eval.greedy=true",
            f"eval.policy={policy}",
            f"eval.baseline={policy}",
            f"run_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gold_win_rate"] == pytest.approx(0.5)
    assert summary["gold_score_policy"] == pytest.approx(summary["gold_score_sft"])
    assert summary["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)


def test_pipeline_logs_to_wandb_offline_and_reads_back(tmp_path: Path) -> None:
    run_dir = tmp_path / "pipe"
    env = cli_env()
    del env["WANDB_MODE"]  # no key and no mode: offline by default
    proc = run_cli(
        [
            "experiment=smoke",
            f"run_dir={run_dir}",
            "logger.wandb.group=g1",
            "logger.wandb.tags=[smoke]",
            "+extra.api_key=sk-should-not-appear",
        ],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("gold_win_rate", "gold_score_sft", "gold_score_policy", "kl_to_sft"):
        assert key in summary
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run = read_wandb_offline_run(files[0])
    assert run["group"] == "g1"
    assert run["tags"] == ["smoke", "algorithm:ppo", "reward:bradley_terry", "backend:cpu"]
    assert run["config"]["meta"]["versions"]["torch"].startswith("2.")
    assert len(run["config"]["meta"]["git_commit"] or "") == 40
    assert run["config"]["algorithm"]["name"] == "ppo"
    assert run["config"]["stage"] == "pipeline"
    # An explicitly added secret-looking key is redacted before it reaches W&B.
    assert run["config"]["extra"]["api_key"] == "***"
    assert b"sk-should-not-appear" not in files[0].read_bytes()
    assert run["summary"]["gold_win_rate"] == pytest.approx(summary["gold_win_rate"])
    sft_losses = [row["sft/loss"] for row in run["history"] if "sft/loss" in row]
    local = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "sft"]
    assert sft_losses == pytest.approx(local)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.lrr=1", "Key 'lrr' not in 'SFTConfig'"),
        ("algorithm.typo=1", "Key 'typo' not in 'PPOConfig'"),
        ("algorithm=nope", "Could not find 'algorithm/nope'"),
        ("plugins=[nope]", "unknown plugin 'nope' (asked for by plugins); installed plugins:"),
        ("stage=nope", "stage='nope' is not a known stage"),
        ("model.path=/does/not/exist", "/does/not/exist"),
        ("task.sft_data=/no/such.jsonl", "/no/such.jsonl: data file not found"),
    ],
)
def test_bad_config_fails_clearly(tmp_path: Path, override: str, message: str) -> None:
    proc = run_cli(["stage=sft", *SMOKE, override, f"run_dir={tmp_path}"])
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_malformed_data_file_names_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    proc = run_cli(["stage=sft", *SMOKE, f"task.sft_data={data}", f"run_dir={tmp_path / 'r'}"])
    assert proc.returncode == 2
    # Without "response" the line is read as a standard prompt/completion record.
    assert f"{data}:3: missing field 'completion'" in proc.stderr
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    proc = run_cli(["stage=sft", *SMOKE, f"task.sft_data={data}", f"run_dir={tmp_path / 'r'}"])
    assert f"{data}:2: invalid JSON" in proc.stderr


def test_sft_from_a_jsonl_file(tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    rows = [{"prompt": "User: Say hi.\nAssistant:", "response": "hi"}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(
        ["stage=sft", *SMOKE, f"task.sft_data={data}", "sft.steps=3", f"run_dir={tmp_path / 'r'}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["sft_examples"] == 8.0


def test_rl_with_lora_exports_a_merged_policy(sft_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="LoRA needs the optional 'lora' extra (peft)")
    proc = run_cli(
        [
            "stage=rl",
            *SMOKE,
            "reward=[gold]",
            "model.lora.r=4",
            "rl.optim.lr=1e-2",
            f"model.path={sft_run / 'sft'}",
            f"run_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "policy")
    base = AutoModelForCausalLM.from_pretrained(sft_run / "sft")
    assert not any("lora" in name for name in exported.state_dict())
    changed = [
        name
        for name, p in exported.state_dict().items()
        if not torch.equal(p, base.state_dict()[name])
    ]
    # Only the adapted layers moved (merged updates); embeddings stayed frozen.
    assert changed and all(".attn." in n or ".mlp." in n for n in changed)
