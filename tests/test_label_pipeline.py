"""``stage=feedback feedback.annotator=app``: the stage queues its samples for people, waits
resumably, and the labels two annotators give in the app train a reward model."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from alignkit.data.feedback import RankingFeedback, read_feedback
from alignkit.label import add_annotator, create_app, queue_progress, read_queue
from alignkit.label.app import close_app

from .conftest import SMOKE, run_cli

PROMPTS = 3


def _feedback_args(sft_run: Path, run_dir: Path) -> list[str]:
    return [
        "stage=feedback",
        *SMOKE,
        "feedback.annotator=app",
        f"feedback.num_prompts={PROMPTS}",
        "feedback.queue.labels_per_item=2",
        "feedback.queue.serve=false",
        "feedback.queue.wait_seconds=0",
        f"feedback.policy={sft_run / 'sft'}",
        f"run_dir={run_dir}",
    ]


def _label_everything(client: FlaskClient, reverse: bool) -> int:
    """Rank every item the annotator is shown: the shown order (or its reverse) from best;
    returns how many items were labelled."""
    done = 0
    while 'name="item_id"' in (page := client.get("/").text):
        item_id = re.search(r'name="item_id" value="([^"]*)"', page)
        csrf = re.search(r'name="csrf_token" value="([^"]*)"', page)
        assert item_id and csrf
        k = len(re.findall(r'<pre class="text response-text">', page))
        form = {"item_id": html.unescape(item_id.group(1)), "csrf_token": csrf.group(1)}
        for p in range(k):
            form[f"rank-{p}"] = str(k - p if reverse else p + 1)
        assert client.post("/label", data=form).status_code == 303
        done += 1
    return done


def test_the_feedback_stage_waits_for_people_and_their_labels_train_a_reward_model(
    sft_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = run_cli(_feedback_args(sft_run, run_dir))
    assert first.returncode != 0
    assert "0/6 labels" in first.stderr and "run the same command again" in first.stderr
    queue = run_dir / "feedback_queue"
    assert len(read_queue(queue).items) <= PROMPTS
    needed = queue_progress(queue)["labels_needed"]

    app = create_app(queue, secret_key="test")
    try:
        clients = []
        for name in ("ana", "ben"):
            client = app.test_client()
            assert client.get(f"/?token={add_annotator(queue, name)}").status_code == 303
            clients.append(client)
        assert _label_everything(clients[0], reverse=False) == needed // 2
        # Resuming before the queue is done still waits, and loses nothing.
        again = run_cli(_feedback_args(sft_run, run_dir))
        assert again.returncode != 0 and f"{needed // 2}/{needed} labels" in again.stderr
        assert _label_everything(clients[1], reverse=True) == needed // 2
    finally:
        close_app(app)

    done = run_cli(_feedback_args(sft_run, run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_feedback(run_dir / "feedback" / "rankings.jsonl")
    assert len(records) == needed  # one ranking per label: both annotators, every item
    assert all(isinstance(r, RankingFeedback) and r.prompt_id for r in records)
    # the two annotators ranked in opposite orders of what they were shown
    by_prompt: dict[str | None, list[list[int]]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt_id, []).append(r.ranks)
    assert all(len(ranks) == 2 for ranks in by_prompt.values())

    rm = run_cli(
        [
            "stage=reward_model",
            *SMOKE,
            f"reward_model.data=[{run_dir / 'feedback'}]",
            f"reward_model.backbone={sft_run / 'sft'}",
            f"run_dir={run_dir}",
        ]
    )
    assert rm.returncode == 0, rm.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "rm_heldout_accuracy" in summary
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model")
    assert model.config.num_labels == 1


def test_a_queue_of_other_samples_is_refused(sft_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_cli(_feedback_args(sft_run, run_dir)).returncode != 0
    proc = run_cli([*_feedback_args(sft_run, run_dir), "feedback.seed=7"])
    assert proc.returncode != 0
    assert "a queue of other samples is already here" in proc.stderr


@pytest.mark.parametrize("wait", ["-1", "x"])
def test_bad_queue_settings_name_the_key(tmp_path: Path, wait: str) -> None:
    proc = run_cli(["stage=feedback", *SMOKE, f"feedback.queue.wait_seconds={wait}"])
    assert proc.returncode != 0 and "feedback.queue.wait_seconds" in proc.stderr
