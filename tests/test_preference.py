"""The DPO family: the registered preference losses, the pair scores and pairs, preference
data from every format, and DPO / online DPO runs (offline, online, in the pipeline)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from alignkit_plugins import dpo

from alignkit.batch import Rollout
from alignkit.data import preference_pairs
from alignkit.errors import DataError
from alignkit.rl import PreferenceLoss, best_worst_rows, pair_batch, pair_scores
from alignkit.tracking import read_metrics

from .conftest import SMOKE, run_cli


def _cfg(**kw: float) -> SimpleNamespace:
    return SimpleNamespace(**{"beta": 0.1, "label_smoothing": 0.0, "gamma": 0.5, **kw})


# ---------------------------------------------------------------------------------- losses


def test_dpo_sigmoid_loss_with_and_without_label_smoothing() -> None:
    h = torch.tensor([0.0, 2.0])
    loss = dpo.LOSSES["sigmoid"](h, _cfg(beta=0.5))
    # h = 0: -log sigmoid(0) = log 2; h = 2: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    assert loss.tolist() == pytest.approx([math.log(2), 0.3132617], abs=1e-6)
    smoothed = dpo.LOSSES["sigmoid"](h, _cfg(beta=0.5, label_smoothing=0.25))
    # 0.75 * 0.3132617 + 0.25 * -log sigmoid(-1) (= 1.3132617) = 0.5632617
    assert smoothed.tolist() == pytest.approx([math.log(2), 0.5632617], abs=1e-6)


def test_ipo_loss_is_the_squared_distance_to_one_over_two_beta() -> None:
    loss = dpo.LOSSES["ipo"](torch.tensor([1.0, 2.0, 3.5]), _cfg(beta=0.25))
    assert loss.tolist() == pytest.approx([1.0, 0.0, 2.25])  # target 1 / (2 * 0.25) = 2
    assert dpo.LOSSES["ipo"].length_normalised and dpo.LOSSES["ipo"].reference


def test_simpo_loss_subtracts_the_margin_and_needs_no_reference() -> None:
    loss = dpo.LOSSES["simpo"](torch.tensor([0.25, 1.0]), _cfg(beta=2.0, gamma=0.5))
    # 2 * 0.25 - 0.5 = 0 -> log 2; 2 * 1 - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.2014133
    assert loss.tolist() == pytest.approx([math.log(2), 0.2014133], abs=1e-6)
    assert not dpo.LOSSES["simpo"].reference and dpo.LOSSES["simpo"].length_normalised


def test_the_dpo_gradient_raises_the_chosen_reply_against_the_rejected() -> None:
    h = torch.tensor([0.3], requires_grad=True)
    dpo.LOSSES["sigmoid"](h, _cfg()).sum().backward()
    # d/dh -log sigmoid(beta h) = -beta * sigmoid(-beta h) < 0: descent raises h
    assert h.grad is not None
    assert h.grad.item() == pytest.approx(-0.1 * torch.sigmoid(torch.tensor(-0.03)).item())


# ------------------------------------------------------------------------ scores and pairs


LOGP = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
REF = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (PreferenceLoss(F.logsigmoid), [-0.5, 0.5]),  # (0.5 - 1.0), (0.5): summed log-ratios
        (PreferenceLoss(F.logsigmoid, length_normalised=True), [-0.25, 0.5]),  # token means
        (PreferenceLoss(F.logsigmoid, reference=False, length_normalised=True), [-1.5, -0.5]),
        (PreferenceLoss(F.logsigmoid, reference=False), [-3.0, -0.5]),
    ],
)
def test_pair_scores_sum_or_average_the_log_ratio_or_the_log_likelihood(
    loss: PreferenceLoss, expected: list[float]
) -> None:
    assert pair_scores(LOGP, REF, MASK, loss).tolist() == pytest.approx(expected)


def _scored(rewards: list[float], group: int) -> Rollout:
    rows = len(rewards)
    return Rollout(
        prompt_ids=torch.ones(rows, 1, dtype=torch.long),
        prompt_mask=torch.ones(rows, 1, dtype=torch.long),
        response_ids=torch.arange(rows)[:, None],
        response_mask=torch.ones(rows, 1),
        group_ids=torch.arange(rows // group).repeat_interleave(group),
        rewards=torch.tensor(rewards),
        responses=[f"r{i}" for i in range(rows)],
    )


def test_best_worst_rows_skip_tied_groups_and_take_the_first_extreme() -> None:
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 1.0, 0.0, 1.0])
    groups = torch.arange(3).repeat_interleave(3)
    assert best_worst_rows(rewards, groups).tolist() == [1, 0, 6, 7]


def test_pair_batch_is_in_the_pair_layout() -> None:
    pairs = pair_batch(_scored([0.2, 0.7, 0.4, 0.4, 0.0, 0.3], group=2))
    assert pairs.responses == ["r1", "r0", "r5", "r4"]  # chosen at even rows
    assert pairs.group_ids.tolist() == [0, 0, 1, 1]
    assert pairs.rewards is not None and pairs.rewards.tolist() == pytest.approx(
        [0.7, 0.2, 0.3, 0.0]
    )


# ---------------------------------------------------------------------------------- data


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pairs_from_a_ranking_are_every_ordered_untied_comparison(tmp_path: Path) -> None:
    ranking = {"prompt": "q", "prompt_id": "p1", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}
    pairs = preference_pairs(_write(tmp_path / "rankings.jsonl", [ranking]))
    assert sorted(pairs["p1"]) == [("b", "a"), ("b", "c")]  # a and c tie: no pair


def test_pairs_from_a_feedback_folder_and_from_ratings(tmp_path: Path) -> None:
    folder = tmp_path / "feedback"
    folder.mkdir()
    _write(
        folder / "ratings.jsonl",
        [
            {"prompt": "q", "prompt_id": "p", "response": "x", "score": 2},
            {"prompt": "q", "prompt_id": "p", "response": "y", "score": 5},
        ],
    )
    _write(folder / "pairs.jsonl", [{"prompt": "r", "chosen": "u", "rejected": "v"}])
    pairs = preference_pairs(folder)
    assert pairs["p"] == [("y", "x")]
    # no prompt_id: keyed as the standard formats derive a plain prompt's id
    (key,) = set(pairs) - {"p"}
    assert pairs[key] == [("u", "v")]


def test_pairs_from_standard_preference_data_keyed_by_prompt_id(tmp_path: Path) -> None:
    records = [
        {"id": "a", "prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"id": "a", "prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "same"}],
         "rejected": [{"role": "assistant", "content": "same"}]},
    ]  # fmt: skip
    assert preference_pairs(_write(tmp_path / "prefs.jsonl", records)) == {
        "a": [("hello", "go away")]  # the identical pair is dropped
    }


def test_bad_preference_data_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with path.open("a") as f:
        f.write('{"prompt": "q", "chosen": 3, "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"prefs\.jsonl:2"):
        preference_pairs(path)
    tied = _write(
        tmp_path / "tied.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranks": [0, 0]}]
    )
    with pytest.raises(DataError, match="no preference pairs"):
        preference_pairs(tied)


# ------------------------------------------------------------------------------------ runs


def _rl_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]


@pytest.fixture(scope="module")
def feedback(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rankings of the smoke SFT policy's samples by the simulated human."""
    run_dir = tmp_path_factory.mktemp("feedback")
    args = ["stage=feedback", *SMOKE, f"feedback.policy={sft_run / 'sft'}", f"run_dir={run_dir}"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir / "feedback"


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_dpo_trains_on_pipeline_feedback_and_logs_the_policy_not_the_data(
    sft_run: Path, feedback: Path, tmp_path: Path, loss: str
) -> None:
    args = [
        "stage=rl",
        "algorithm=dpo",
        f"algorithm.preference_loss={loss}",
        *SMOKE,
        "reward=[]",
        "rl.steps=3",
        "rl.prompts_per_step=4",
        "algorithm.minibatch_size=8",  # the step's 4 pairs in one optimizer step
        "rl.probe_every=2",
        "algorithm.beta=0.5",
        f"algorithm.data={feedback}",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path}",
    ]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rl_rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert {"loss/policy", "pref/accuracy", "pref/margin", "pref/pairs"} <= set(row)
        assert row["pref/pairs"] == 4 and "reward/total" not in row
    # the policy's own samples on probe steps (0, 2) and the last: gold and drift, never the data
    assert ["gold/score" in r for r in rows] == [True, False, True]
    assert all(0 <= r["gold/score"] <= 1 and "response/length" in r for r in (rows[0], rows[2]))
    if loss != "simpo":  # the policy is the reference at step 0: h = 0 on every pair
        assert rows[0]["pref/margin"] == pytest.approx(0.0, abs=1e-5)
        expected = math.log(2) if loss == "sigmoid" else (1 / (2 * 0.5)) ** 2
        assert rows[0]["loss/policy"] == pytest.approx(expected, rel=1e-4)
        assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)


def test_online_dpo_pairs_the_best_and_worst_sample_of_each_prompt(
    sft_run: Path, tmp_path: Path
) -> None:
    args = ["stage=rl", "algorithm=online_dpo", *SMOKE, "reward=[gold]", "rl.samples_per_prompt=4"]
    proc = run_cli([*args, f"model.path={sft_run / 'sft'}", f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rl_rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        # engine metrics describe every sample; dpo/* the pairs
        assert {"reward/total", "gold/score", "pref/accuracy", "pref/pairs"} <= set(row)
        assert 0 <= row["pref/pairs"] <= 4  # prompts_per_step of the smoke budget
    assert rows[0]["pref/margin"] == pytest.approx(0.0, abs=1e-5)


def test_online_dpo_refuses_one_sample_per_prompt(sft_run: Path, tmp_path: Path) -> None:
    args = ["stage=rl", "algorithm=online_dpo", *SMOKE, "reward=[gold]", "rl.samples_per_prompt=1"]
    proc = run_cli([*args, f"model.path={sft_run / 'sft'}", f"run_dir={tmp_path}"])
    assert proc.returncode != 0
    assert "samples_per_prompt" in proc.stderr


def test_an_unknown_preference_loss_fails_before_any_model_loads(tmp_path: Path) -> None:
    args = ["stage=rl", "algorithm=dpo", *SMOKE, "algorithm.preference_loss=kto", "reward=[]"]
    proc = run_cli([*args, f"run_dir={tmp_path}"])
    assert proc.returncode != 0
    assert "algorithm.preference_loss=kto" in proc.stderr and "ipo, sigmoid, simpo" in proc.stderr


def test_dpo_in_the_pipeline_trains_on_its_feedback_without_a_reward_model(tmp_path: Path) -> None:
    proc = run_cli(["algorithm=dpo", *SMOKE, "rl.steps=2", f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "feedback").is_dir() and (tmp_path / "rl" / "policy").is_dir()
    assert not (tmp_path / "reward_model").exists()  # the gold oracle evaluates
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["win_rate_source"] == "gold" and 0 <= summary["gold_win_rate"] <= 1
    assert "rm_heldout_accuracy" not in summary


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_with_lora_on_a_chat_llama_uses_the_adapter_free_base_as_reference(
    tmp_path: Path, loss: str
) -> None:
    """Standard conversational preference data, a tiny Llama with a chat template, LoRA: the
    reference is the base with adapters disabled, so the first step's margin is 0; the saved
    policy is merged and loads with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    from .test_own_data import DATA, _module

    model = _module("make_model").main(DATA, tmp_path / "llama")
    args = [
        "stage=rl",
        "algorithm=dpo",
        f"algorithm.preference_loss={loss}",
        "algorithm.beta=0.5",
        "algorithm.minibatch_size=8",
        "task=data",
        "model=hf",
        f"model.path={model}",
        f"task.preference_data={DATA / 'preferences.jsonl'}",
        "reward=[]",
        "model.lora.r=4",
        "rl.steps=2",
        "rl.prompts_per_step=4",
        "rl.probe_every=1",
        "rl.max_new_tokens=6",
        "rl.optim.lr=1e-3",
        "logger=none",
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rl_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1]
    if loss == "sigmoid":
        assert rows[0]["pref/margin"] == pytest.approx(0.0, abs=1e-5)
        assert rows[0]["loss/policy"] == pytest.approx(math.log(2), rel=1e-4)
        assert rows[1]["kl/ref"] > 0  # the adapters moved the policy off the base
    assert all("response/length" in r for r in rows)  # probe samples of the policy
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "rl" / "policy")
    assert merged.config.model_type == "llama"
    assert not any("lora" in name for name, _ in merged.named_parameters())
