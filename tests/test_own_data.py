"""``task=data``: a researcher's own prompts, demonstrations and preferences, end to end on a
tiny Llama with a chat template, evaluated by a reward model and a pairwise judge."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from alignkit.errors import ConfigError, DataError
from alignkit.tasks.data import DataTask

from .conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "own_data"
DATA = EXAMPLE / "data"
SKY = [{"role": "user", "content": "What color is the sky?"}]


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ the task


def test_prompts_from_every_source_kind_and_an_explicit_eval_set(tmp_path: Path) -> None:
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question {i}?"} for i in range(20)])
    held = _jsonl(tmp_path / "e.jsonl", [{"prompt": SKY}])
    task = DataTask(prompt_data=str(prompts), eval_data=str(held))
    assert [p.text for p in task.eval_prompts()] == ["What color is the sky?"]
    assert len(task.train_prompts()) == 20
    assert task.prompt_messages(task.eval_prompts()[0]) == SKY
    assert task.format_prompt(task.train_prompts()[0]) == "User: Question 0?\nAssistant:"
    assert not hasattr(task, "gold_score")


def test_seeded_heldout_fraction_is_stable_and_disjoint(tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}?"} for i in range(200)]
    a = DataTask(prompt_data=str(_jsonl(tmp_path / "a.jsonl", rows)), eval_fraction=0.2)
    b = DataTask(prompt_data=str(_jsonl(tmp_path / "b.jsonl", rows[::-1])), eval_fraction=0.2)
    ids_a = {p.id for p in a.eval_prompts()}
    assert ids_a == {p.id for p in b.eval_prompts()}  # the file order does not matter
    assert 20 <= len(ids_a) <= 60
    assert not ids_a & {p.id for p in a.train_prompts()}
    other = DataTask(prompt_data=str(tmp_path / "a.jsonl"), eval_fraction=0.2, seed=1)
    assert {p.id for p in other.eval_prompts()} != ids_a


def test_prompts_and_demonstrations_fall_back_to_the_preference_data(tmp_path: Path) -> None:
    prefs = _jsonl(
        tmp_path / "prefs.jsonl",
        [{"chosen": f"Q{i} is blue.", "rejected": f"Q{i} is green."} for i in range(10)]
        + [{"prompt": "Q99 is", "completion": " red.", "label": True}]
        + [{"prompt": "Q98 is", "completion": " odd.", "label": False}],
    )
    task = DataTask(preference_data=str(prefs), eval_fraction=0.3)
    assert len(task.all_prompts()) == 12
    demos = task.examples()
    assert len(demos) == 11  # ten chosen replies and the one desirable unpaired reply
    assert demos[0].prompt.text == "Q0 is" and demos[0].completion == " blue."
    assert demos[-1].completion == " red."


def test_column_mapping_and_errors_name_the_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "good", "bad"])
        for i in range(6):
            writer.writerow([f"Question {i}?", "yes", "no"])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    task = DataTask(preference_data=str(path), columns=columns, eval_fraction=0.3)
    assert task.preferences()[0].chosen == "yes"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    bad.write_text(bad.read_text() + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3.*rejected"):
        DataTask(preference_data=str(bad)).preferences()
    with pytest.raises(ConfigError, match=r"task\.prompt_data, task\.preference_data"):
        DataTask()


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _module("make_model").main(DATA, tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def rule_judge() -> Iterator[str]:
    answers = json.loads((DATA / "answers.json").read_text())
    judge = _module("rule_judge").RuleJudge(answers).start()
    yield judge.url
    judge.stop()


def example_args(model: Path, judge_url: str, run_dir: Path) -> list[str]:
    return [
        "task=data",
        "model=hf",
        f"model.path={model}",
        f"task.sft_data={DATA / 'sft.jsonl'}",
        f"task.prompt_data={DATA / 'prompts.jsonl'}",
        f"task.preference_data={DATA / 'preferences.jsonl'}",
        f"task.eval_data={DATA / 'eval_prompts.jsonl'}",
        "eval.judge.backend=http",
        f"eval.judge.url={judge_url}",
        "eval.judge.top_logprobs=0",
        f"run_dir={run_dir}",
        "logger=none",
    ]


def test_the_whole_pipeline_on_own_data_with_a_chat_template(
    tiny_chat_llama: Path, rule_judge: str, tmp_path: Path
) -> None:
    """SFT -> reward model on the preference file -> PPO -> judged evaluation, at a smoke
    budget; the reward model is a real sequence-classification model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = tmp_path / "run"
    budget = [
        "sft.steps=40",
        "reward_model.epochs=1",
        "rl.steps=2",
        "rl.prompts_per_step=4",
        "rl.samples_per_prompt=2",
        "rl.max_new_tokens=8",
        "eval.max_new_tokens=8",
        "eval.samples_per_prompt=2",
    ]
    proc = run_cli([*example_args(tiny_chat_llama, rule_judge, run_dir), *budget])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["win_rate"] == summary["judge_win_rate"]
    assert 0.0 <= summary["judge_win_rate"] <= 1.0 and 0.0 <= summary["rm_win_rate"] <= 1.0
    assert summary["rm_data_records"] == 112.0  # the preference file, with no feedback stage
    assert summary["eval_prompts"] == 11.0
    assert not (run_dir / "feedback").exists()
    assert "gold_win_rate" not in summary and "gold_score_sft" not in summary
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model")
    tok = AutoTokenizer.from_pretrained(run_dir / "reward_model")
    assert model.config.num_labels == 1 and tok.chat_template
    # SFT trained the assistant turn in the template: the policy's samples end at <|im_end|>.
    samples = json.loads((run_dir / "eval_samples.json").read_text())
    assert all("<|im_end|>" not in str(cell) for row in samples["rows"] for cell in row)


def test_sft_on_own_data_learns_the_assistant_turn(tiny_chat_llama: Path, tmp_path: Path) -> None:
    """The SFT stage on the example's ``messages`` file: the trained policy closes its reply
    with the template's end-of-turn token, which the base model never does."""
    from alignkit.data.chat import PromptFormat
    from alignkit.models import load_causal_lm

    run_dir = tmp_path / "sft_run"
    args = [
        "stage=sft",
        "task=data",
        "model=hf",
        f"model.path={tiny_chat_llama}",
        f"task.sft_data={DATA / 'sft.jsonl'}",
        "sft.steps=120",
        "sft.lr=3e-3",
        f"run_dir={run_dir}",
        "logger=none",
    ]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model, tok = load_causal_lm(run_dir / "sft")
    fmt = PromptFormat(tok, "chat", model=model)
    question = [{"role": "user", "content": "What is the opposite of hot?"}]
    prompt, reply = fmt.encode(question, "cold")
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(ids).logits[0]
    # The probability of the end-of-turn token right after "cold" is high after SFT.
    end = len(prompt) + len(reply) - 1
    p_end = torch.softmax(logits[end - 1], -1)[reply[-1]].item()
    assert p_end > 0.5, p_end


def _shell_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a markdown file, as written."""
    blocks, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() == "```bash":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.slow
def test_the_documented_example_runs_as_written() -> None:
    """docs/data.md's example, run exactly as written from the repository root: the judged
    evaluation lands in summary.json, and RL on the example's preferences (the concise
    answer preferred) shortened the policy's replies."""
    import os
    import subprocess

    from .conftest import cli_env

    block = _shell_blocks(REPO / "docs" / "data.md")[-1]
    assert "rule_judge.py" in block and "task=data" in block
    env = cli_env(OMP_NUM_THREADS="2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # The judge is started in the background by the block; the trap stops it afterwards.
    script = f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{block}\n"
    proc = subprocess.run(
        ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((REPO / "outputs" / "own_data" / "summary.json").read_text())
    assert summary["win_rate_source"] == "judge"
    assert summary["win_rate"] == summary["judge_win_rate"]
    assert summary["judge_failures"] == 0.0
    assert summary["length_policy"] < summary["length_baseline"]


def test_feedback_from_the_simulated_human_needs_a_gold_oracle(
    tiny_chat_llama: Path, tmp_path: Path
) -> None:
    args = [
        "stage=feedback",
        "task=data",
        "model=hf",
        f"model.path={tiny_chat_llama}",
        f"task.prompt_data={DATA / 'prompts.jsonl'}",
        f"run_dir={tmp_path}",
        "logger=none",
    ]
    proc = run_cli(args)
    assert proc.returncode == 2
    assert "feedback.annotator=simulated_human needs a task with a gold oracle" in proc.stderr
    assert "task.preference_data" in proc.stderr


def test_a_pipeline_with_nothing_to_evaluate_by_fails_before_training(tmp_path: Path) -> None:
    """Own data, a rule-based reward only, no judge: refused at once, not after RL."""
    args = [
        "task=data",
        f"task.sft_data={DATA / 'sft.jsonl'}",
        "reward=[eos_penalty]",
        f"run_dir={tmp_path}",
        "logger=none",
    ]
    proc = run_cli(args)
    assert proc.returncode == 2
    assert "evaluation would have nothing to judge the RL policy by" in proc.stderr
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("targets", ["all-linear", "null"])
def test_rl_with_lora_default_targets_on_a_llama(
    tiny_chat_llama: Path, tmp_path: Path, targets: str
) -> None:
    """LoRA's default targets fit any architecture (all linear layers, or peft's defaults with
    null): RL on a tiny Llama trains adapters and saves a merged policy."""
    from alignkit.models.lora import lora_targets

    assert lora_targets(None) is None and lora_targets(["q_proj"]) == ["q_proj"]
    with pytest.raises(ConfigError, match="target_modules is empty"):
        lora_targets([])
    args = [
        "stage=rl",
        "task=data",
        "model=hf",
        f"model.path={tiny_chat_llama}",
        f"task.prompt_data={DATA / 'prompts.jsonl'}",
        "reward=[eos_penalty]",
        "model.lora.r=4",
        f"model.lora.target_modules={targets}",
        "rl.steps=2",
        "rl.prompts_per_step=2",
        "rl.samples_per_prompt=2",
        "rl.max_new_tokens=6",
        f"run_dir={tmp_path}",
        "logger=none",
    ]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "policy")
    assert merged.config.model_type == "llama"
    assert not any("lora" in name for name, _ in merged.named_parameters())
