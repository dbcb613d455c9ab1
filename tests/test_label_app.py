"""The labelling app (``alignkit label``) through Flask's test client: assignment, answers,
undo, validation, crash safety, exports, agreement statistics and the command line."""

from __future__ import annotations

import html
import json
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from alignkit.data import load_preferences
from alignkit.data.feedback import RankingFeedback, RatingFeedback, read_feedback
from alignkit.errors import DataError
from alignkit.label import (
    add_annotator,
    create_app,
    export_labels,
    queue_progress,
    read_queue,
    write_queue,
)
from alignkit.label.app import SECRET_FILE, close_app
from alignkit.label.cli import redact
from alignkit.label.db import DB_FILE, LabelStore, display_order, pick_next
from alignkit.label.stats import (
    compare_rankings,
    krippendorff_alpha,
    label_stats,
    ranking_agreement,
)
from tests.conftest import REPO, cli_env

ITEMS: list[dict[str, Any]] = [
    {
        "id": "q1",
        "prompt": "User: What is 2 plus 3?\nAssistant:",
        "prompt_id": "arith-plus-2-3",
        "responses": ["5", "6", "2 plus 3 is 5."],
        "meta": {"policy": "sft"},
    },
    {
        "id": "q2",
        "prompt": "User: Say hello.\nAssistant:",
        "prompt_id": None,
        "responses": ["Hello!", "<script>alert('x')</script>"],
        "meta": {},
    },
    {
        "id": "q3",
        "prompt": "User: Count from 3 to 6.\nAssistant:",
        "prompt_id": "instruct-countup-3-6",
        "responses": ["3 4 5 6", "3, 4, 5, 6", "3 4 5"],
        "meta": {},
    },
]
BY_ID = {item["id"]: item for item in ITEMS}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    return write_queue(tmp_path / "queue", ITEMS, labels_per_item=2)


@pytest.fixture
def app(queue_dir: Path) -> Iterator[Flask]:
    app = create_app(queue_dir, secret_key="test-secret")
    app.config["TESTING"] = True
    yield app
    close_app(app)


def login(app: Flask, queue_dir: Path, name: str) -> FlaskClient:
    """A browser session of a new annotator ``name``, logged in through the link."""
    client = app.test_client()
    response = client.get(f"/?token={add_annotator(queue_dir, name)}")
    assert response.status_code == 303 and response.headers["Location"] == "/"
    return client


def field(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no field {name} in the page"
    return html.unescape(match.group(1))


def shown(page: str) -> tuple[str, str, list[str]]:
    """(item id, CSRF token, response texts in the order shown) of a label page."""
    texts = re.findall(r'<pre class="text response-text">(.*?)</pre>', page, re.S)
    return field(page, "item_id"), field(page, "csrf_token"), [html.unescape(t) for t in texts]


def label_form(
    page: str,
    ranks: Sequence[int] | None,
    ratings: Sequence[int] | None = None,
    critiques: dict[int, str] | None = None,
) -> dict[str, str]:
    """The form that gives ``ranks``/``ratings`` (by original response index, rank 0 best)."""
    item_id, csrf, texts = shown(page)
    responses = BY_ID[item_id]["responses"]
    form = {"csrf_token": csrf, "item_id": item_id}
    for p, text in enumerate(texts):
        i = responses.index(text)
        if ranks is not None:
            form[f"rank-{p}"] = str(ranks[i] + 1)
        if ratings is not None:
            form[f"rating-{p}"] = str(ratings[i])
        if critiques and i in critiques:
            form[f"critique-{p}"] = critiques[i]
    return form


def current_item(client: FlaskClient) -> str | None:
    """The item the annotator is shown now (None on the done page)."""
    page = client.get("/").text
    return shown(page)[0] if 'name="item_id"' in page else None


def answer(
    client: FlaskClient,
    ranks: Sequence[int],
    ratings: Sequence[int],
    critiques: dict[int, str] | None = None,
) -> str:
    """Label the item shown now; returns its id."""
    page = client.get("/").text
    form = label_form(page, ranks, ratings, critiques)
    response = client.post("/label", data=form)
    assert response.status_code == 303, response.text
    return form["item_id"]


def post(client: FlaskClient, path: str, follow: bool = False, **data: str) -> Any:
    """POST a form of the page shown now (its CSRF token and item) with ``data``."""
    page = client.get("/").text
    form = {"csrf_token": field(page, "csrf_token"), **data}
    if 'name="item_id"' in page:
        form.setdefault("item_id", shown(page)[0])
    return client.post(path, data=form, follow_redirects=follow)


def stored_labels(queue_dir: Path) -> list[tuple[str, str]]:
    """(item id, kind) of every answer in the database, oldest first."""
    store = LabelStore(queue_dir)
    try:
        return [(label.item_id, label.kind) for label in store.labels()]
    finally:
        store.close()


# What two annotators answer (original response order; rank 0 best), checked by hand below.
A_LABELS = {
    "q1": ([0, 2, 1], [7, 1, 5]),
    "q2": ([0, 1], [6, 2]),
    "q3": ([0, 0, 1], [4, 4, 1]),  # a tie between the first two
}
B_LABELS = {
    "q1": ([1, 2, 0], [5, 1, 7]),
    "q2": ([0, 1], [7, 1]),
    "q3": ([0, 1, 2], [5, 3, 1]),
}


def label_all(client: FlaskClient, labels: dict[str, tuple[list[int], list[int]]]) -> list[str]:
    """Answer every item the annotator is given; the ids in the order they came."""
    seen: list[str] = []
    while (item_id := current_item(client)) is not None:
        ranks, ratings = labels[item_id]
        critiques = {1: "Wrong: 2 plus 3 is 5."} if item_id == "q1" else None
        seen.append(answer(client, ranks, ratings, critiques))
        assert len(seen) <= len(ITEMS), f"items repeated: {seen}"
    return seen


# --------------------------------------------------------------------------------------------
# the queue folder
# --------------------------------------------------------------------------------------------


def test_queue_round_trips(queue_dir: Path) -> None:
    queue = read_queue(queue_dir)
    assert [i.id for i in queue.items] == ["q1", "q2", "q3"]
    assert queue.items[0].responses == ("5", "6", "2 plus 3 is 5.")
    assert queue.items[0].meta == {"policy": "sft"} and queue.items[1].prompt_id is None
    settings = json.loads((queue_dir / "queue.json").read_text())
    assert settings["labels_per_item"] == 2 and settings["rating_scale"] == 7
    assert settings["tasks"] == ["rank", "rate", "critique"] and settings["created"]
    assert not list(queue_dir.glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize(
    ("items", "kwargs", "message"),
    [
        ([{"id": "a", "prompt": "p", "responses": ["x"]}], {}, "at least 2 entries"),
        ([ITEMS[0], ITEMS[0]], {}, "duplicate item id 'q1'"),
        ([{"id": "a", "prompt": "p", "responses": ["x", 3]}], {}, "'responses[1]'"),
        (ITEMS, {"rating_scale": 11}, "'rating_scale' must be an integer in 2..10"),
        (ITEMS, {"labels_per_item": 0}, "'labels_per_item' must be an integer >= 1"),
        (ITEMS, {"tasks": ["rank", "vote"]}, "'tasks' must be a non-empty subset"),
    ],
)
def test_bad_queues_are_refused(
    tmp_path: Path, items: list[dict[str, Any]], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        write_queue(tmp_path / "queue", items, **kwargs)


def test_read_queue_names_the_file_and_line(queue_dir: Path) -> None:
    path = queue_dir / "items.jsonl"
    path.write_text(path.read_text() + '{"id": "q4", "prompt": "p"}\n')
    with pytest.raises(DataError, match=r"items\.jsonl:4: field 'responses'"):
        read_queue(queue_dir)


# --------------------------------------------------------------------------------------------
# assignment, answers, undo
# --------------------------------------------------------------------------------------------


def test_two_annotators_label_the_queue_and_export(
    app: Flask, queue_dir: Path, tmp_path: Path
) -> None:
    ana, ben = login(app, queue_dir, "ana"), login(app, queue_dir, "ben")
    assert label_all(ana, A_LABELS) == ["q1", "q2", "q3"]
    assert "Nothing left for you" in ana.get("/").text
    assert label_all(ben, B_LABELS) == ["q1", "q2", "q3"]
    progress = queue_progress(queue_dir)
    assert progress["complete"] and progress["labels_given"] == progress["labels_needed"] == 6

    paths = export_labels(queue_dir, tmp_path / "out")
    assert sorted(paths) == ["critiques", "flags", "preferences", "rankings", "ratings"]
    rankings = read_feedback(paths["rankings"], rating_scale=7)
    assert all(isinstance(r, RankingFeedback) for r in rankings)
    rows = [json.loads(line) for line in paths["rankings"].read_text().splitlines()]
    got = {(row["item_id"], row["annotator"]): row["ranks"] for row in rows}
    assert got == {
        ("q1", "a1"): [0, 2, 1],
        ("q1", "a2"): [1, 2, 0],
        ("q2", "a1"): [0, 1],
        ("q2", "a2"): [0, 1],
        ("q3", "a1"): [0, 0, 1],
        ("q3", "a2"): [0, 1, 2],
    }
    first = rankings[0]
    assert first.prompt == ITEMS[0]["prompt"] and first.prompt_id == "arith-plus-2-3"
    assert first.responses == ITEMS[0]["responses"]  # original order, whatever was shown
    assert rankings[2].prompt_id is None  # q2 has none

    ratings = read_feedback(paths["ratings"], rating_scale=7)
    assert len(ratings) == 16 and all(isinstance(r, RatingFeedback) for r in ratings)
    assert [(r.response, r.score) for r in ratings[:3]] == [
        ("5", 7.0),
        ("6", 1.0),
        ("2 plus 3 is 5.", 5.0),
    ]

    critiques = [json.loads(line) for line in paths["critiques"].read_text().splitlines()]
    assert [(c["response"], c["critique"], c["annotator"]) for c in critiques] == [
        ("6", "Wrong: 2 plus 3 is 5.", "a1"),
        ("6", "Wrong: 2 plus 3 is 5.", "a2"),
    ]
    assert set(critiques[0]) >= {"prompt", "prompt_id", "response", "critique", "annotator"}

    # Ordered untied pairs: ana 3 + 1 + 2 (the tie gives none), ben 3 + 1 + 3.
    preferences = load_preferences(paths["preferences"])
    assert len(preferences) == 13
    assert [(p.chosen, p.rejected) for p in preferences[:3]] == [
        ("5", "6"),
        ("5", "2 plus 3 is 5."),
        ("2 plus 3 is 5.", "6"),
    ]
    first_pair = json.loads(paths["preferences"].read_text().splitlines()[0])
    assert first_pair == {
        "prompt": ITEMS[0]["prompt"],
        "chosen": "5",
        "rejected": "6",
        "prompt_id": "arith-plus-2-3",
    }
    assert paths["flags"].read_text() == ""
    text = "".join(p.read_text() for p in paths.values())
    assert "ana" not in text and "ben" not in text  # opaque ids only

    # Agreement, by hand: q1 shares 3 ordered pairs and agrees on 2, q2 1 of 1, q3 2 of 2
    # (ana tied responses 0 and 1, so that pair is not shared).
    stats = label_stats(queue_dir)
    assert (stats.ranking.agree, stats.ranking.shared) == (5, 6)
    assert [(a.name, a.labels, a.skips, a.flags) for a in stats.annotators] == [
        ("ana", 3, 0, 0),
        ("ben", 3, 0, 0),
    ]
    units = [
        [a, b]
        for item_id in ("q1", "q2", "q3")
        for a, b in zip(A_LABELS[item_id][1], B_LABELS[item_id][1], strict=True)
    ]
    assert stats.alpha_interval == pytest.approx(krippendorff_alpha(units, "interval"))
    assert stats.rating_units == 8


def test_the_stored_label_maps_the_shuffle_back(app: Flask, queue_dir: Path) -> None:
    ana = login(app, queue_dir, "ana")
    page = ana.get("/").text
    _, _, texts = shown(page)
    order = display_order(1, "q1", 3)
    assert texts == [ITEMS[0]["responses"][i] for i in order]
    # Two annotators see different orders of the same item (for these ids).
    assert display_order(1, "q1", 3) != display_order(2, "q1", 3)
    answer(ana, [2, 0, 1], [1, 7, 4])
    store = LabelStore(queue_dir)
    (label,) = store.labels()
    store.close()
    assert label.order == order and label.ranks == [2, 0, 1] and label.ratings == [1, 7, 4]


def test_annotators_working_at_once_get_different_items(app: Flask, queue_dir: Path) -> None:
    ana, ben = login(app, queue_dir, "ana"), login(app, queue_dir, "ben")
    assert current_item(ana) == "q1"
    assert current_item(ben) == "q2"  # q1 is being labelled by ana
    assert current_item(ana) == "q1"  # a reload shows the same item
    answer(ben, *B_LABELS["q2"])
    assert current_item(ben) == "q3"
    answer(ana, *A_LABELS["q1"])
    assert current_item(ana) == "q2"  # least labelled first: q2 has 1 label, q3 is ben's


def test_pick_next_prefers_the_least_labelled_item() -> None:
    ids = ["a", "b", "c"]
    assert pick_next(ids, 2, {"a": 1}, set(), {}) == "b"
    assert pick_next(ids, 2, {"a": 1, "b": 1, "c": 1}, set(), {}) == "a"
    assert pick_next(ids, 2, {}, {"a"}, {"b": 1}) == "c"
    assert pick_next(ids, 2, {"a": 2, "b": 2}, set(), {}) == "c"
    assert pick_next(ids, 1, {}, set(), {}, my_recent=["c"]) == "c"
    assert pick_next(ids, 1, {"a": 1, "b": 1, "c": 1}, set(), {}) is None


def test_undo_removes_the_last_label(app: Flask, queue_dir: Path, tmp_path: Path) -> None:
    ana = login(app, queue_dir, "ana")
    answer(ana, *A_LABELS["q1"])
    answer(ana, [1, 0], [2, 6])
    response = post(ana, "/undo")
    assert response.status_code == 303
    assert stored_labels(queue_dir) == [("q1", "label")]  # q2's label is gone
    assert current_item(ana) == "q2"  # and q2 is back, first
    answer(ana, [0, 1], [6, 2])
    post(ana, "/undo")
    assert "Undid your last label" in post(ana, "/undo", follow=True).text
    assert stored_labels(queue_dir) == [] and current_item(ana) == "q1"
    assert "Nothing to undo" in post(ana, "/undo", follow=True).text
    answer(ana, *A_LABELS["q1"])
    paths = export_labels(queue_dir, tmp_path / "out")
    assert [r.ranks for r in read_feedback(paths["rankings"])] == [[0, 2, 1]]


def test_skip_and_flag_are_recorded(app: Flask, queue_dir: Path, tmp_path: Path) -> None:
    ana = login(app, queue_dir, "ana")
    assert post(ana, "/skip").status_code == 303
    assert current_item(ana) == "q2"
    assert post(ana, "/flag", reason="unsafe").status_code == 303
    bad = post(ana, "/flag", reason="boring")
    assert bad.status_code == 400 and "A flag needs a reason" in bad.text
    progress = queue_progress(queue_dir)
    # A flag settles one of the item's labels; a skip hands the item to someone else.
    assert progress["per_item"]["q1"] == {
        "answers": 0,
        "labels": 0,
        "skips": 1,
        "flags": 0,
        "done": False,
    }
    assert progress["per_item"]["q2"]["answers"] == 1 and progress["flags"] == 1
    paths = export_labels(queue_dir, tmp_path / "out")
    flags = [json.loads(line) for line in paths["flags"].read_text().splitlines()]
    assert [(f["item_id"], f["kind"], f["reason"], f["annotator"]) for f in flags] == [
        ("q1", "skip", None, "a1"),
        ("q2", "flag", "unsafe", "a1"),
    ]
    stats = label_stats(queue_dir)
    assert (stats.skips, stats.flags, stats.flag_reasons) == (1, 1, {"unsafe": 1})
    # ben gets the skipped item: it still needs its labels.
    ben = login(app, queue_dir, "ben")
    assert current_item(ben) == "q1"


def test_validation_errors_are_clear(app: Flask, queue_dir: Path) -> None:
    ana = login(app, queue_dir, "ana")
    page = ana.get("/").text
    form = label_form(page, [0, 1, 2], [7, 9, 3])
    form["rank-1"] = ""
    form["rank-2"] = "x"
    response = ana.post("/label", data=form)
    assert response.status_code == 400
    errors = [html.unescape(e) for e in re.findall(r"<li>(.*?)</li>", response.text)]
    position_of_6 = shown(page)[2].index("6")
    assert errors == [
        "Response B: choose a rank (1 = best).",
        "Response C: the rank must be a whole number from 1 to 3.",
        f"Response {'ABC'[position_of_6]}: rating 9 is outside the scale 1..7.",
    ]
    assert f'<option value="{form["rank-0"]}" selected>' in response.text  # input is kept
    assert stored_labels(queue_dir) == []
    del form["rating-0"]
    errors = re.findall(r"<li>(.*?)</li>", ana.post("/label", data=form).text)
    assert "Response A: choose a rating from 1 to 7." in errors


def test_critique_only_queue_needs_one_critique(tmp_path: Path) -> None:
    queue_dir = write_queue(tmp_path / "queue", ITEMS, tasks=["critique"])
    app = create_app(queue_dir, secret_key="s")
    ana = login(app, queue_dir, "ana")
    page = ana.get("/").text
    assert 'name="rank-0"' not in page and 'name="rating-0"' not in page
    form = label_form(page, None)
    assert "Write a critique of at least one response." in ana.post("/label", data=form).text
    form = label_form(page, None, critiques={0: "Right, but terse."})
    assert ana.post("/label", data=form).status_code == 303
    paths = export_labels(queue_dir, tmp_path / "out")
    assert paths["rankings"].read_text() == "" and paths["ratings"].read_text() == ""
    assert json.loads(paths["critiques"].read_text())["critique"] == "Right, but terse."
    close_app(app)


def test_a_label_survives_the_app_being_discarded(queue_dir: Path) -> None:
    first = create_app(queue_dir)  # the key lives in the queue folder
    ana = login(first, queue_dir, "ana")
    answer(ana, *A_LABELS["q1"])
    # Committed when the response came back: a separate connection sees it at once.
    with sqlite3.connect(queue_dir / DB_FILE) as db:
        assert db.execute("SELECT item_id, kind FROM labels").fetchall() == [("q1", "label")]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    cookie_name = first.config["SESSION_COOKIE_NAME"]
    cookie = ana.get_cookie(cookie_name)
    assert cookie is not None
    close_app(first)
    del first, ana
    second = create_app(queue_dir)
    client = second.test_client()
    client.set_cookie(cookie_name, cookie.value)
    assert current_item(client) == "q2"  # the old session works and q1 stays labelled
    close_app(second)
    assert stat.S_IMODE((queue_dir / SECRET_FILE).stat().st_mode) == 0o600


# --------------------------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------------------------


def test_bad_tokens_and_missing_logins_are_refused(app: Flask, queue_dir: Path) -> None:
    client = app.test_client()
    assert client.get("/?token=not-a-token").status_code == 403
    assert client.get("/").status_code == 403
    assert client.get("/progress").status_code == 403
    assert client.post("/label", data={"item_id": "q1"}).status_code == 403
    ana = login(app, queue_dir, "ana")
    # A form without the session's CSRF token (another site's form) is refused.
    response = ana.post("/label", data={"item_id": "q1", "csrf_token": "forged"})
    assert response.status_code == 400 and "reload" in response.text
    assert stored_labels(queue_dir) == []


def test_a_new_link_replaces_the_old_one(app: Flask, queue_dir: Path) -> None:
    old_token = add_annotator(queue_dir, "ana")
    client = app.test_client()
    assert client.get(f"/?token={old_token}").status_code == 303
    new_token = add_annotator(queue_dir, "ana")
    assert client.get("/").status_code == 403  # the old session ended
    assert app.test_client().get(f"/?token={old_token}").status_code == 403
    assert app.test_client().get(f"/?token={new_token}").status_code == 303
    # Only hashes are stored.
    with sqlite3.connect(queue_dir / DB_FILE) as db:
        stored = db.execute("SELECT name, token_hash FROM annotators").fetchall()
    assert stored[0][0] == "ana" and new_token not in stored[0][1] and len(stored) == 1


def test_responses_are_shown_as_text(app: Flask, queue_dir: Path) -> None:
    ana = login(app, queue_dir, "ana")
    answer(ana, *A_LABELS["q1"])
    response = ana.get("/")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in response.text
    assert "<script>alert" not in response.text
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "http://" not in response.text and "https://" not in response.text  # no CDN


def test_tokens_are_redacted_from_request_logs() -> None:
    line = '"GET /?token=abc-DEF_123&x=1 HTTP/1.1" 303 -'
    assert redact(line) == '"GET /?token=[redacted]&x=1 HTTP/1.1" 303 -'


def test_progress_endpoints(app: Flask, queue_dir: Path) -> None:
    client = app.test_client()
    assert client.get("/healthz").json == {"status": "ok", "items": 3}
    ana = login(app, queue_dir, "ana")
    answer(ana, *A_LABELS["q1"])
    progress = client.get("/api/progress").json
    assert progress["labels_given"] == 1 and progress["labels_needed"] == 6
    assert progress["per_item"]["q1"]["labels"] == 1 and not progress["complete"]
    page = ana.get("/progress").text
    assert re.search(r"You: <span id=\"mine-count\">1</span> of 3 items answered", page)
    assert "Pairwise ranking agreement" in page and "ana" in page
    assert re.search(r"0 of 3 items done\s+\(2 per item\) · labels 1 ·", page)


# --------------------------------------------------------------------------------------------
# agreement statistics, by hand
# --------------------------------------------------------------------------------------------


def test_pairwise_agreement_by_hand() -> None:
    # a: 0 > 1 > 2; b: 2 > 0 > 1 orders (0,1) the same way, (0,2) and (1,2) the other way.
    result = compare_rankings([0, 1, 2], [1, 2, 0])
    assert (result.agree, result.shared) == (1, 3)
    # a: 0 > 1 > 2; b: 0 > 2 > 1: 3 shared pairs, (0,1) and (0,2) agree -> 2/3.
    result = compare_rankings([0, 1, 2], [0, 2, 1])
    assert (result.agree, result.shared) == (2, 3) and result.value == pytest.approx(2 / 3)
    # A tie in either ranking removes the pair: only (0,2) and (1,2) are shared.
    tied = compare_rankings([0, 0, 1], [1, 0, 2])
    assert (tied.agree, tied.shared) == (2, 2)
    total, pairs = ranking_agreement(
        {"q1": {"a1": [0, 1, 2], "a2": [0, 2, 1]}, "q2": {"a1": [0, 1], "a2": [1, 0]}}
    )
    assert (total.agree, total.shared) == (2, 4) and pairs[("a1", "a2")].value == 0.5


def test_krippendorff_alpha_by_hand() -> None:
    # Two units, (1, 2) and (3, 3). Coincidences: o_12 = o_21 = 1, o_33 = 2; n_1 = n_2 = 1,
    # n_3 = 2, n = 4. Interval: sum o d = 2 * 1 = 2; sum n_c n_k d over ordered pairs
    # = 2 * (1*1*1 + 1*2*4 + 1*2*1) = 22; alpha = 1 - (4 - 1) * 2 / 22 = 8/11.
    assert krippendorff_alpha([[1, 2], [3, 3]], "interval") == pytest.approx(8 / 11)
    # Ordinal: d_12 = (1 + 1 - 1)^2 = 1, d_13 = (1 + 1 + 2 - 1.5)^2 = 6.25, d_23 = (1 + 2 - 1.5)^2
    # = 2.25; expected = 2 * (1 + 2 * 6.25 + 2 * 2.25) = 36; alpha = 1 - 3 * 2 / 36 = 5/6.
    assert krippendorff_alpha([[1, 2], [3, 3]], "ordinal") == pytest.approx(5 / 6)
    assert krippendorff_alpha([[4, 4], [4, 4]]) is None  # no variation: undefined
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable
    assert krippendorff_alpha([[1, 1], [5, 5], [3, 3]]) == 1.0


def test_krippendorff_alpha_matches_the_published_example() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", section C: 4 coders,
    # 12 units, missing values; published alphas: nominal 0.743, ordinal 0.815, interval 0.849.
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*coders, strict=True)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def _label_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alignkit.label.cli", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_adds_an_annotator_and_prints_the_link(queue_dir: Path) -> None:
    proc = _label_cli(str(queue_dir), "--add-annotator", "ana", "--port", "9000")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"^http://127\.0\.0\.1:9000/\?token=([\w-]+)$", proc.stdout, re.M)
    assert match, proc.stdout
    app = create_app(queue_dir, secret_key="s")
    assert app.test_client().get(f"/?token={match.group(1)}").status_code == 303
    close_app(app)


def test_cli_exports_and_reports(app: Flask, queue_dir: Path, tmp_path: Path) -> None:
    ana, ben = login(app, queue_dir, "ana"), login(app, queue_dir, "ben")
    answer(ana, *A_LABELS["q1"])
    assert label_all(ben, B_LABELS) == ["q2", "q3", "q1"]  # the least labelled first
    proc = _label_cli(str(queue_dir), "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "pairwise ranking agreement: 0.667 (2 of 3 shared pairs)" in proc.stdout
    assert re.search(r"a1\s+ana\s+1\s+0\s+0", proc.stdout)
    proc = _label_cli(str(queue_dir), "--export", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "rankings.jsonl: 4 records" in proc.stdout
    assert len(read_feedback(tmp_path / "out" / "rankings.jsonl")) == 4
    missing = _label_cli(str(tmp_path / "nowhere"), "--stats")
    assert missing.returncode == 2 and "queue.json: not found" in missing.stderr
