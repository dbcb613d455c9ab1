"""Feedback data (formats, errors, reports, datasets on disk, conversions), the annotator
plugin, and the ``feedback`` / ``reward_model`` stages through the command line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from alignkit_plugins.simulated_human import SimulatedHumanAnnotator

from alignkit.data.feedback import (
    PairwiseFeedback,
    RankingFeedback,
    RatingFeedback,
    label,
    load_feedback,
    ranking_to_pairs,
    ratings_to_pairs,
    read_feedback,
    to_groups,
    write_feedback_dataset,
    write_feedback_jsonl,
)
from alignkit.errors import DataError
from alignkit.models import is_scalar_head_folder
from alignkit.tasks import AssistTask, SimulatedHuman
from alignkit.tracking import read_metrics
from tests.conftest import SMOKE, cli_env, run_cli

PAIR = {"prompt": "User: hi\nAssistant:", "chosen": "hello", "rejected": "go away"}
RANKING = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1], "prompt_id": "x"}
RATING = {"prompt": "p", "response": "a", "score": 6, "attributes": {"harmlessness": 7}}


def _write(path: Path, *lines: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# -------------------------------------------------------------------------------------------
# formats
# -------------------------------------------------------------------------------------------


def test_reads_each_format_and_round_trips(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.jsonl", {**PAIR, "margin": 2}, RANKING, RATING)
    records = read_feedback(path)
    pair, ranking, rating = records
    assert isinstance(pair, PairwiseFeedback) and pair.margin == 2.0 and pair.prompt_id is None
    assert isinstance(ranking, RankingFeedback) and ranking.ranks == [1, 0, 1]
    assert isinstance(rating, RatingFeedback) and rating.attributes == {"harmlessness": 7.0}
    assert [r.source for r in records] == [f"{path}:{i}" for i in (1, 2, 3)]
    out = write_feedback_jsonl(tmp_path / "out.jsonl", records)
    assert read_feedback(out) == records


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ({"prompt": "p", "chosen": 1, "rejected": "b"}, "field 'chosen' must be a string"),
        ({**PAIR, "margin": -1}, "field 'margin' must be >= 0"),
        ({**PAIR, "margin": "big"}, "field 'margin' must be a number"),
        ({**PAIR, "prompt_id": 3}, "field 'prompt_id' must be a string"),
        ({"prompt": "p", "responses": ["a", 3], "ranks": [0, 1]}, "field 'responses[1]' must be"),
        ({"prompt": "p", "responses": ["a"], "ranks": [0]}, "field 'responses' needs at least 2"),
        ({"prompt": "p", "responses": ["a", "b"]}, "missing field 'ranks'"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "field 'ranks' has 1 entries"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}, "field 'ranks[1]' must be"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]}, "field 'ranks[1]' must be"),
        ({"prompt": "p", "response": "a"}, "missing field 'score'"),
        ({"prompt": "p", "response": "a", "score": "high"}, "field 'score' must be a number"),
        ({"prompt": "p", "response": "a", "score": True}, "field 'score' must be a number"),
        ({**RATING, "attributes": {"helpfulness": "x"}}, "field 'attributes.helpfulness' must"),
        ({**RATING, "attributes": [1]}, "field 'attributes' must be an object"),
        ({"prompt": "p", "answer": "a"}, "cannot tell the feedback format"),
        ('{"prompt": "p", "chosen": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_record_names_file_line_and_field(
    tmp_path: Path, record: object, message: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", PAIR, "", record)  # the bad record is on line 3
    with pytest.raises(DataError) as info:
        read_feedback(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_missing_file_and_empty_folder_are_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="feedback data not found"):
        read_feedback(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"no \*\.jsonl feedback files"):
        read_feedback(tmp_path)


def test_duplicates_empty_responses_and_identical_pairs_are_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "f.jsonl",
        PAIR,
        {**PAIR, "chosen": ""},
        PAIR,
        {**PAIR, "rejected": "hello "},
        {**RANKING, "responses": ["a", " ", "c"]},
    )
    records, report = load_feedback([path])
    assert report.duplicates == [(f"{path}:3", f"{path}:1")]
    assert report.empty_responses == [
        f"{path}:2: field 'chosen'",
        f"{path}:5: field 'responses[1]'",
    ]
    assert report.identical_pairs == [f"{path}:4"]
    assert len(records) == 4  # the duplicate is dropped, the rest is kept
    text = "\n".join(report.lines())
    assert "1 duplicate records" in text and "2 empty responses" in text
    assert report.metrics()["feedback_records"] == 5.0
    # an identical pair carries no preference: it gives no training group
    assert len(to_groups(records)) == 3


# -------------------------------------------------------------------------------------------
# datasets saved to disk
# -------------------------------------------------------------------------------------------


def test_reads_a_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{**PAIR, "margin": 1.0}, {**PAIR, "chosen": "hey", "margin": None}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    records = read_feedback(tmp_path / "ds")
    assert [r.chosen for r in records] == ["hello", "hey"]  # type: ignore[union-attr]
    assert records[1].margin is None and records[1].source == f"{tmp_path / 'ds'}:2"  # type: ignore[union-attr]
    ranks = [RankingFeedback("p", ["a", "b"], [0, 1], "id")] * 2
    ratings = [RatingFeedback("p", "a", 3.0, {"helpfulness": 2.0}), RatingFeedback("p", "b", 5.0)]
    for name, recs in (("r", ranks), ("s", ratings)):
        write_feedback_dataset(tmp_path / name, recs)
        assert read_feedback(tmp_path / name) == recs
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([PAIR]), "test": datasets.Dataset.from_list([PAIR])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.source for r in read_feedback(tmp_path / "dd")] == [
        f"{tmp_path / 'dd'}/train:1",
        f"{tmp_path / 'dd'}/test:1",
    ]


def test_malformed_dataset_row_names_path_row_and_field(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "p", "response": "a", "score": 1.0}, {"prompt": "p", "response": "b"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=f"^{tmp_path / 'ds'}:2: missing field 'score'"):
        read_feedback(tmp_path / "ds")


# -------------------------------------------------------------------------------------------
# conversions
# -------------------------------------------------------------------------------------------


def test_rankings_and_ratings_become_pairs() -> None:
    ranking = RankingFeedback("p", ["a", "b", "c", "d"], [2, 0, 2, 1], "x")
    pairs = ranking_to_pairs(ranking)
    assert sorted((p.chosen, p.rejected) for p in pairs) == [
        ("b", "a"),
        ("b", "c"),
        ("b", "d"),
        ("d", "a"),
        ("d", "c"),
    ]  # a and c are tied: no pair between them
    ratings = [
        RatingFeedback("p", "a", 2.0),
        RatingFeedback("p", "b", 5.0),
        RatingFeedback("p", "c", 5.0),
        RatingFeedback("q", "d", 1.0),
    ]
    got = sorted((p.chosen, p.rejected, p.margin) for p in ratings_to_pairs(ratings))
    assert got == [("b", "a", 3.0), ("c", "a", 3.0)]


def test_groups_of_each_format() -> None:
    groups = to_groups(
        [
            PairwiseFeedback("p", "a", "b", 0.5, "x"),
            RankingFeedback("p", ["a", "b", "c"], [3, 1, 3]),
            RatingFeedback("q", "a", 2.0, {"help": 7.0}),
            RatingFeedback("q", "b", 6.0, {"help": 1.0}),
        ],
        attribute="help",
    )
    pair, ranking, rating = groups
    assert pair.pairs == [(0, 1, 0.5)] and pair.key == "x"
    assert ranking.ranks == [1, 0, 1] and ranking.pairs == [(1, 0, 0.0), (1, 2, 0.0)]
    assert rating.scores == [7.0, 1.0] and rating.pairs == [(0, 1, 6.0)]


# -------------------------------------------------------------------------------------------
# the simulated human annotator
# -------------------------------------------------------------------------------------------


def test_simulated_human_labels_each_format_like_the_gold_oracle() -> None:
    task = AssistTask()
    record = next(r for r in task.train_prompts() if r.kind == "arith")
    responses = [record.answer, f"Well, the answer is {record.answer}.", "100", "Okay."]
    golds = [task.gold_score(record, r) for r in responses]
    annotator = SimulatedHumanAnnotator(SimulatedHuman(task, noise=0.0, seed=0))
    prompt = task.format_prompt(record)
    pairs = label(annotator, "pairwise", record, prompt, responses, record.id)
    assert len(pairs) == 6
    for p in pairs:
        assert task.gold_score(record, p.chosen) >= task.gold_score(record, p.rejected)  # type: ignore[union-attr]
    (ranking,) = label(annotator, "rankings", record, prompt, responses, record.id)
    assert ranking.ranks == [0, 1, 2, 2] and golds[2] == golds[3] == 0.0  # type: ignore[union-attr]
    ratings = label(annotator, "ratings", record, prompt, responses, record.id)
    assert [r.score for r in ratings] == [7.0, 4.0, 1.0, 1.0]  # type: ignore[union-attr]
    assert all(r.prompt_id == record.id and r.prompt == prompt for r in ratings)


def test_noisy_annotator_flips_some_pairwise_labels() -> None:
    task = AssistTask()
    record = next(r for r in task.train_prompts() if r.kind == "arith")
    annotator = SimulatedHumanAnnotator(SimulatedHuman(task, noise=0.3, seed=1))
    wins = [annotator.compare(record, record.answer, "Okay.") for _ in range(400)]
    assert 0.2 < sum(wins) / len(wins) < 0.4


# -------------------------------------------------------------------------------------------
# the stages through the command line (smoke budget)
# -------------------------------------------------------------------------------------------

FEEDBACK_SMOKE = ["feedback.num_prompts=40", "feedback.max_new_tokens=12"]
RM_SMOKE = ["reward_model.epochs=1", "reward_model.batch_size=8", "reward_model.eval_fraction=0.3"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def feedback_run(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``stage=feedback`` (rankings) from the smoke SFT policy, then ``stage=reward_model``."""
    run_dir = tmp_path_factory.mktemp("feedback_run")
    policy = sft_run / "sft"
    proc = run_cli(
        ["stage=feedback", *SMOKE, *FEEDBACK_SMOKE, f"model.path={policy}", f"run_dir={run_dir}"]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_cli(
        [
            "stage=reward_model",
            *SMOKE,
            *RM_SMOKE,
            "reward=bradley_terry",
            f"model.path={policy}",
            f"run_dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_feedback_stage_writes_rankings_from_the_policy(feedback_run: Path) -> None:
    path = feedback_run / "feedback" / "rankings.jsonl"
    records = read_feedback(path)
    task = AssistTask()
    ids = {r.id for r in task.train_prompts()}
    assert 0 < len(records) <= 40
    for record in records:
        assert isinstance(record, RankingFeedback)
        assert record.prompt_id in ids and record.prompt.startswith("User: ")
        assert len(set(record.responses)) == len(record.responses) >= 2
    summary = _summary(feedback_run)
    # the reward_model run overwrote summary.json; the feedback numbers are in metrics.jsonl
    rows = [r for r in read_metrics(feedback_run / "metrics.jsonl") if r["stage"] == "feedback"]
    assert rows[0]["feedback_records"] == len(records)
    assert 0.0 <= rows[0]["feedback_gold_mean"] <= 1.0
    assert summary["stage"] == "reward_model"


def test_reward_model_stage_reports_accuracy_and_saves_a_normalised_folder(
    feedback_run: Path,
) -> None:
    from transformers import AutoTokenizer

    from alignkit.models import ScalarHeadModel

    summary = _summary(feedback_run)
    for key in (
        "rm_heldout_accuracy",
        "rm_gold_agreement",
        "rm_gold_agreement_noise_free",
        "rm_loss",
        "rm_pairs_per_second",
    ):
        assert 0.0 <= summary[key] <= (1.0 if "accuracy" in key or "gold" in key else 1e9), key
    assert summary["rm_heldout_pairs"] > 0 and summary["rm_train_groups"] > 0
    folder = feedback_run / "reward_model"
    head = json.loads((folder / "config.json").read_text())["alignkit_normalization"]
    assert head["std"] == pytest.approx(summary["rm_norm_std"]) and head["std"] != 1.0
    model = ScalarHeadModel.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert float(model.std) == pytest.approx(head["std"]) and len(tok) > 0
    rows = [r for r in read_metrics(feedback_run / "metrics.jsonl") if r["stage"] == "reward_model"]
    assert "loss" in rows[0] and "rm_heldout_accuracy" in rows[-1]


def test_rl_scores_rollouts_with_the_trained_reward_model(
    feedback_run: Path, sft_run: Path, tmp_path: Path
) -> None:
    rm = feedback_run / "reward_model"
    args = ["stage=rl", *SMOKE, f"model.path={sft_run / 'sft'}", f"run_dir={tmp_path}"]
    proc = run_cli([*args, "reward=[gold,bradley_terry]", f"reward.bradley_terry.path={rm}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert all("reward/bradley_terry" in r and "reward/gold" in r for r in rows)

    proc = run_cli([*args, "reward=bradley_terry"])
    assert proc.returncode != 0
    assert "reward.bradley_terry.path is not set" in proc.stderr


@pytest.mark.parametrize(
    ("fmt", "reward", "extra"),
    [
        ("pairwise", "bradley_terry", ["reward.bradley_terry.center_coef=0.01"]),
        ("rankings", "plackett_luce", ["reward.plackett_luce.all_pairs=true"]),
        ("ratings", "rating_regression", []),
    ],
)
def test_each_format_and_variant_through_the_cli(
    sft_run: Path, tmp_path: Path, fmt: str, reward: str, extra: list[str]
) -> None:
    policy = f"model.path={sft_run / 'sft'}"
    common = [*SMOKE, policy, f"run_dir={tmp_path}"]
    proc = run_cli(
        [
            "stage=feedback",
            *common,
            *FEEDBACK_SMOKE,
            "feedback.num_prompts=16",
            f"feedback.format={fmt}",
            "feedback.noise=0.1",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "feedback" / f"{fmt}.jsonl").is_file()
    if fmt == "pairwise":  # normalise on fresh samples of the policy instead of the data's
        extra = [*extra, f"reward_model.normalize_policy={sft_run / 'sft'}"]
        extra += ["reward_model.normalize_samples=12"]
    proc = run_cli(
        [
            "stage=reward_model",
            *common,
            *RM_SMOKE,
            "reward_model.steps=2",
            f"reward={reward}",
            *extra,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{reward} loss on" in proc.stderr
    assert is_scalar_head_folder(tmp_path / "reward_model")
    assert _summary(tmp_path)["rm_norm_std"] != 1.0


def test_ensemble_members_are_trained_and_scored_in_rl(sft_run: Path, tmp_path: Path) -> None:
    policy = f"model.path={sft_run / 'sft'}"
    common = [*SMOKE, policy, f"run_dir={tmp_path}"]
    proc = run_cli(["stage=feedback", *common, *FEEDBACK_SMOKE, "feedback.num_prompts=16"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_cli(
        [
            "stage=reward_model",
            *common,
            *RM_SMOKE,
            "reward_model.steps=2",
            "reward=rm_ensemble",
            "reward_model.ensemble_size=2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(tmp_path)
    assert "rm_member_1_heldout_accuracy" in summary
    rm = tmp_path / "reward_model"
    assert sorted(p.name for p in rm.iterdir()) == ["member_0", "member_1"]
    rl_dir = tmp_path / "rl_run"
    proc = run_cli(
        [
            "stage=rl",
            *SMOKE,
            policy,
            f"run_dir={rl_dir}",
            "reward=rm_ensemble",
            f"reward.rm_ensemble.paths=[{rm}]",
            "reward.rm_ensemble.mode=conservative",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in read_metrics(rl_dir / "metrics.jsonl") if r["stage"] == "rl"]
    assert all("reward/rm_ensemble" in r for r in rows)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward_model.epoch=2", "Key 'epoch' not in 'RewardModelConfig'"),
        ("reward.bradley_terry.marginn=1", "Key 'marginn' not in 'BradleyTerryConfig'"),
        ("feedback.format=votes", "feedback.format='votes'"),
        ("feedback.annotator=nobody", "unknown annotator 'nobody'; registered: "),
    ],
)
def test_bad_feedback_config_fails_clearly(tmp_path: Path, override: str, message: str) -> None:
    args = ["stage=feedback", *SMOKE, "model.path=/unused", f"run_dir={tmp_path}", override]
    if "bradley_terry" in override:
        args.insert(1, "reward=bradley_terry")
    proc = run_cli(args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_reward_model_on_malformed_data_names_the_line(tmp_path: Path) -> None:
    data = _write(tmp_path / "fb.jsonl", PAIR, {"prompt": "p", "chosen": "a"})
    proc = run_cli(
        [
            "stage=reward_model",
            *SMOKE,
            "model.path=/unused",
            f"reward_model.data=[{data}]",
            f"run_dir={tmp_path / 'r'}",
        ]
    )
    assert proc.returncode == 2
    assert f"{data}:2: missing field 'rejected'" in proc.stderr


def test_a_team_can_plug_in_its_own_annotator(sft_run: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "team_annotator.py"
    plugin.write_text(
        textwrap.dedent(
            '''
            from alignkit import hookimpl

            class ShortestFirst:
                """Prefers the shorter response (a stand-in for a labelling team)."""

                def compare(self, record, a, b):
                    return 0 if len(a) <= len(b) else 1

                def rank(self, record, responses):
                    order = sorted(set(len(r) for r in responses))
                    return [order.index(len(r)) for r in responses]

                def rate(self, record, response):
                    return {"helpfulness": 1.0, "brevity": float(len(response) < 10)}

            @hookimpl
            def register_components(registry):
                registry.add("annotator", "shortest", lambda ctx: ShortestFirst())
            '''
        )
    )
    env = cli_env(ALIGNKIT_PLUGINS="team=team_annotator", PYTHONPATH=str(tmp_path))
    args = ["stage=feedback", *SMOKE, *FEEDBACK_SMOKE, f"model.path={sft_run / 'sft'}"]
    args += ["feedback.num_prompts=8", "feedback.annotator=shortest", f"run_dir={tmp_path / 'r'}"]
    proc = run_cli([*args, "feedback.format=pairwise"], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pairs = read_feedback(tmp_path / "r" / "feedback" / "pairwise.jsonl")
    assert pairs and all(len(p.chosen) <= len(p.rejected) for p in pairs)  # type: ignore[union-attr]
    proc = run_cli([*args, "feedback.format=ratings"], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ratings = read_feedback(tmp_path / "r" / "feedback" / "ratings.jsonl")
    assert all(r.attributes and set(r.attributes) == {"helpfulness", "brevity"} for r in ratings)  # type: ignore[union-attr]


# -------------------------------------------------------------------------------------------
# the built-in task end to end, at a larger budget
# -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_model_agrees_with_the_gold_oracle(tmp_path: Path) -> None:
    """Default SFT policy -> the noise-free oracle's feedback -> reward model; gold agreement on
    noise-free pairs (the default's noisy labels: tests/test_slow_human_feedback.py)."""
    proc = run_cli(["stage=sft", "logger=none", f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    oracle = ["experiment=oracle_feedback", "logger=none", f"run_dir={tmp_path}"]
    proc = run_cli(["stage=feedback", *oracle])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_cli(["stage=reward_model", *oracle])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(tmp_path)
    assert summary["rm_noise_free_pairs"] >= 50
    assert summary["rm_gold_agreement_noise_free"] >= GOLD_THRESHOLD, summary


GOLD_THRESHOLD = 0.65
"""Measured 0.75 at the noise-free budget (docs/feedback.md); a margin for seeds and machines."""
