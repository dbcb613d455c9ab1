"""Continuous improvement: ``pipeline.rounds`` (sample -> label -> reward model extended -> RL
from the current policy), active selection of what to label, ``reward_model.init`` and
``pipeline.sft_policy``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from alignkit.errors import ConfigError
from alignkit.stages import active
from alignkit.stages.active import disagreement, pair_probabilities, prompt_order, uncertainty
from alignkit.stages.feedback import label_cost
from alignkit.stages.rounds import RoundTracker, shares
from alignkit.tracking import read_metrics

from .conftest import SMOKE, run_cli

LN3 = math.log(3.0)


def test_shares_split_evenly_with_the_remainder_first() -> None:
    assert shares(10, 3) == [4, 3, 3]
    assert shares(2200, 3) == [734, 733, 733]
    assert shares(75, 1) == [75] and sum(shares(7, 4)) == 7


def test_pair_probabilities_are_bradley_terry_for_every_pair() -> None:
    scores = torch.tensor([[0.0, LN3, 0.0]])
    # pairs (0, 1), (0, 2), (1, 2): sigmoid(-ln 3) = 1/4, sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4
    expected = torch.tensor([[0.25, 0.5, 0.75]])
    assert torch.allclose(pair_probabilities(scores), expected, atol=1e-6)


def test_disagreement_is_the_members_spread_not_the_mean_models_doubt() -> None:
    # Two members ordering one pair oppositely, each 3:1 sure: probabilities 1/4 and 3/4.
    split = torch.tensor([[0.0, LN3], [0.0, -LN3]])
    assert disagreement(split) == pytest.approx(0.25, abs=1e-6)  # population std of 1/4, 3/4
    assert uncertainty(split) == pytest.approx(1.0, abs=1e-6)  # their mean is a coin flip
    # Members agreeing on the same 1/4: no disagreement, uncertainty 1 - |2/4 - 1| = 1/2.
    agree = torch.tensor([[0.0, LN3], [0.0, LN3]])
    assert disagreement(agree) == pytest.approx(0.0, abs=1e-7)
    assert uncertainty(agree) == pytest.approx(0.5, abs=1e-6)
    # Averaged over pairs: (0.25 + 0 + 0.25) / 3 for three responses where one pair agrees.
    three = torch.tensor([[0.0, LN3, 0.0], [0.0, -LN3, 0.0]])
    assert disagreement(three) == pytest.approx(0.5 / 3, abs=1e-6)
    assert disagreement(torch.zeros(3, 1)) == 0.0 and uncertainty(torch.zeros(1, 1)) == 0.0


def _ctx(tmp_path: Path, **feedback: Any) -> SimpleNamespace:
    cfg = OmegaConf.create(
        {
            "feedback": {
                "selection": "random",
                "selection_model": None,
                "max_labels": 100,
                **feedback,
            }
        }
    )
    return SimpleNamespace(cfg=cfg)


def test_prompt_order_puts_the_most_disputed_prompts_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "rm"
    for i in range(2):
        (model / f"member_{i}").mkdir(parents=True)
    spread = {"a": 0.0, "b": LN3, "c": LN3 / 3, "d": 2 * LN3}

    def fake_scores(ctx: Any, folder: Any, records: Any, groups: Any) -> list[torch.Tensor]:
        assert Path(folder) == model
        return [torch.tensor([[0.0, spread[r]], [0.0, -spread[r]]]) for r in records]

    monkeypatch.setattr(active, "member_scores", fake_scores)
    records, groups = list("abcd"), [["x", "y"]] * 4
    ctx = _ctx(tmp_path, selection="disagreement", selection_model=str(model))
    assert [records[i] for i in prompt_order(ctx, records, groups, 0)] == list("dbca")
    # random: a seeded permutation, the same for the same seed
    plain = _ctx(tmp_path)
    order = prompt_order(plain, records, groups, 3)
    assert sorted(order) == [0, 1, 2, 3] and order == prompt_order(plain, records, groups, 3)


def test_selection_errors_name_the_key(tmp_path: Path) -> None:
    records, groups = ["a"], [["x", "y"]]
    with pytest.raises(ConfigError, match=r"feedback\.selection='best'"):
        prompt_order(_ctx(tmp_path, selection="best"), records, groups, 0)
    with pytest.raises(ConfigError, match=r"feedback\.max_labels is not set"):
        prompt_order(_ctx(tmp_path, selection="uncertainty", max_labels=None), records, groups, 0)
    with pytest.raises(ConfigError, match=r"feedback\.selection_model"):
        prompt_order(_ctx(tmp_path, selection="uncertainty"), records, groups, 0)
    one = tmp_path / "one"
    one.mkdir()
    ctx = _ctx(tmp_path, selection="disagreement", selection_model=str(one))
    with pytest.raises(ConfigError, match="needs an ensemble"):
        prompt_order(ctx, records, groups, 0)


class _Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[str, int, dict[str, Any]]] = []
        self.tables: list[str] = []
        self.run_dir = Path("/nowhere")

    def log(self, metrics: dict[str, Any], *, step: int, stage: str) -> None:
        self.logged.append((stage, step, dict(metrics)))

    def rewind(self, stage: str, step: int) -> int:
        return step

    def log_table(self, name: str, columns: Any, rows: Any, **kwargs: Any) -> None:
        self.tables.append(name)


def test_a_rounds_tracker_counts_rl_steps_on_and_tags_the_round() -> None:
    inner = _Recorder()
    tracker = RoundTracker(inner, index=2, offset=25)
    tracker.log({"loss": 1.0}, step=3, stage="rl")
    tracker.log({"loss": 2.0}, step=3, stage="reward_model")
    tracker.log_table("rl_samples_step_000000", ["a"], [[1]])
    assert inner.logged == [
        ("rl", 28, {"loss": 1.0, "round": 2}),
        ("reward_model", 3, {"loss": 2.0, "round": 2}),
    ]
    assert tracker.rewind("rl", 5) == 30 and tracker.rewind("feedback", 5) == 5
    assert inner.tables == ["round_2_rl_samples_step_000000"] and tracker.run_dir == inner.run_dir


def _head(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))["score.weight"].flatten()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def feedback_run(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("rounds_feedback")
    args = ["stage=feedback", *SMOKE, "feedback.max_labels=60", f"run_dir={run_dir}"]
    proc = run_cli([*args, f"feedback.policy={sft_run / 'sft'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        [
            "stage=reward_model",
            *SMOKE,
            f"reward_model.backbone={sft_run / 'sft'}",
            f"run_dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_reward_model_init_goes_on_training_the_given_model(
    feedback_run: Path, sft_run: Path, tmp_path: Path
) -> None:
    """At a learning rate too small to move it, an extended model keeps the given model's head
    (its direction: the normalisation rescales it); a fresh head under another seed does not."""
    base = [
        *SMOKE,
        "stage=reward_model",
        "seed=5",
        "reward_model.lr=1e-12",
        f"reward_model.data=[{feedback_run / 'feedback'}]",
        f"reward_model.backbone={sft_run / 'sft'}",
    ]
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    proc = run_cli(
        [*base, f"reward_model.init={feedback_run / 'reward_model'}", f"run_dir={extended}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extending" in proc.stdout + proc.stderr
    assert run_cli([*base, f"run_dir={fresh}"]).returncode == 0
    given = _head(feedback_run / "reward_model")
    assert _cos(_head(extended / "reward_model"), given) > 0.999
    assert _cos(_head(fresh / "reward_model"), given) < 0.9


def test_reward_model_init_must_match_the_ensemble(
    feedback_run: Path, sft_run: Path, tmp_path: Path
) -> None:
    args = [
        *SMOKE,
        "stage=reward_model",
        f"reward_model.data=[{feedback_run / 'feedback'}]",
        f"reward_model.backbone={sft_run / 'sft'}",
        f"run_dir={tmp_path}",
    ]
    proc = run_cli(
        [
            *args,
            f"reward_model.init={feedback_run / 'reward_model'}",
            "reward_model.ensemble_size=2",
            "reward=[rm_ensemble]",
        ]
    )
    assert proc.returncode != 0
    assert "reward_model.init=" in proc.stderr and "2 member(s)" in proc.stderr
    proc = run_cli([*args, f"reward_model.init={sft_run / 'sft'}"])
    assert proc.returncode != 0 and "found no trained reward model" in proc.stderr
    # The same when members would be averaged (every member goes on from one folder).
    averaged = ["reward_model.ensemble_size=2", "reward_model.merge=average"]
    proc = run_cli([*args, *averaged, f"reward_model.init={sft_run / 'sft'}"])
    assert proc.returncode != 0 and "found no trained reward model" in proc.stderr


def test_two_rounds_extend_the_reward_model_and_train_on_from_the_last_policy(
    sft_run: Path, tmp_path: Path
) -> None:
    budget = 120
    proc = run_cli(
        [
            *SMOKE,
            f"pipeline.sft_policy={sft_run / 'sft'}",
            "pipeline.rounds=2",
            "rl.steps=4",
            "rl.optim.lr=1e-3",
            f"feedback.max_labels={budget}",
            "reward=[rm_ensemble]",
            "reward_model.ensemble_size=2",
            "feedback.selection=disagreement",
            f"run_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp_path / "sft").exists()  # the given SFT policy, no SFT stage
    out = proc.stdout + proc.stderr
    assert f"sampling 291 prompts x 4 from {tmp_path / 'round_1' / 'rl' / 'policy'}" in out
    assert f"ordered by disagreement of 2 reward model(s) in {tmp_path / 'round_1'}" in out
    assert f"extending {tmp_path / 'round_1' / 'reward_model'}" in out
    spent = []
    for r in (1, 2):
        lines = (tmp_path / f"round_{r}" / "feedback" / "rankings.jsonl").read_text().splitlines()
        spent.append(sum(label_cost("rankings", len(json.loads(x)["responses"])) for x in lines))
        assert (tmp_path / f"round_{r}" / "reward_model" / "member_1" / "config.json").is_file()
        assert (tmp_path / f"round_{r}" / "rl" / "policy" / "config.json").is_file()
    assert all(0 < s <= budget // 2 for s in spent)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["feedback_labels"] == sum(spent)
    assert summary["round_1/labels"] == spent[0] and summary["labels_total"] == sum(spent)
    assert summary["gold_win_rate"] == summary["round_2/gold_win_rate"]
    assert 0.0 <= summary["round_1/gold_win_rate"] <= 1.0
    rl = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert [(r["step"], r["round"]) for r in rl if "kl/ref" in r] == [
        (0, 1),
        (1, 1),
        (2, 2),
        (3, 2),
    ]
    # Round 1 starts at its reference (the SFT policy); round 2 starts from round 1's policy
    # but keeps the SFT reference, so its first KL is not ~0 (round 1 moved: lr 1e-3).
    kl = {r["step"]: r["kl/ref"] for r in rl if "kl/ref" in r}
    assert kl[0] < 1e-3 and kl[2] > 0.1
    rounds = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "round"]
    assert [r["step"] for r in rounds] == [1, 2] and rounds[1]["labels"] == sum(spent)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["pipeline.rounds=0"], "pipeline.rounds must be >= 1"),
        (["pipeline.rounds=2", "reward=[gold]"], "no active reward is learned"),
        (["pipeline.rounds=5", "rl.steps=3"], "needs rl.steps >= 5"),
        (["pipeline.sft_policy=/nonexistent/sft"], "pipeline.sft_policy=/nonexistent/sft"),
        (["feedback.selection=uncertainty"], "set feedback.selection_model="),
        (
            ["pipeline.rounds=2", "feedback.selection=uncertainty", "feedback.max_labels=null"],
            "feedback.max_labels is not set",
        ),
    ],
)
def test_round_settings_are_checked_before_training(
    extra: list[str], message: str, tmp_path: Path
) -> None:
    proc = run_cli([*SMOKE, *extra, f"run_dir={tmp_path}"])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "sft").exists()


def test_rounds_of_dpo_train_each_round_on_that_rounds_feedback(
    sft_run: Path, tmp_path: Path
) -> None:
    """Iterative DPO: no reward model, each round's pairs from the last round's policy."""
    proc = run_cli(
        [
            *SMOKE,
            "algorithm=dpo",
            f"pipeline.sft_policy={sft_run / 'sft'}",
            "pipeline.rounds=2",
            "rl.steps=2",
            "feedback.max_labels=60",
            "feedback.selection=uncertainty",
            f"run_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "every round labels prompts in a seeded random order" in out
    assert f"from {tmp_path / 'round_1' / 'rl' / 'policy'}" in out
    for r in (1, 2):
        assert (tmp_path / f"round_{r}" / "feedback" / "rankings.jsonl").is_file()
        assert not (tmp_path / f"round_{r}" / "reward_model").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["round_1/labels"] < summary["round_2/labels"] <= 60


def test_average_weights_is_the_members_mean() -> None:
    from alignkit.stages.reward_model import average_weights

    members = []
    for value in (1.0, 2.0, 6.0):
        model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(model.weight, value)
        torch.nn.init.constant_(model.bias, -value)
        members.append(SimpleNamespace(model=model))
    merged = average_weights(members)  # type: ignore[arg-type]
    assert merged is members[0]
    assert torch.equal(merged.model.weight, torch.full((1, 2), 3.0))
    assert torch.equal(merged.model.bias, torch.full((1,), -3.0))


def test_an_averaged_ensemble_is_one_reward_model(
    feedback_run: Path, sft_run: Path, tmp_path: Path
) -> None:
    """``reward_model.merge=average``: one folder (no member folders) that the default learned
    reward scores, the members' held-out accuracies reported, and a later round extends it."""
    args = [
        *SMOKE,
        "stage=reward_model",
        "reward_model.ensemble_size=2",
        "reward_model.merge=average",
        f"reward_model.data=[{feedback_run / 'feedback'}]",
        f"reward_model.backbone={sft_run / 'sft'}",
    ]
    proc = run_cli([*args, f"run_dir={tmp_path / 'a'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "a" / "reward_model"
    assert (out / "config.json").is_file() and not list(out.glob("member_*"))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {"rm_member_0_heldout_accuracy", "rm_member_1_heldout_accuracy"} <= set(summary)
    proc = run_cli([*args, f"reward_model.init={out}", f"run_dir={tmp_path / 'b'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"extending {out}" in proc.stdout + proc.stderr
