"""The labelling app in a real browser (headless Chromium): two annotators label a queue with
the keyboard, the mouse and drag and drop; undo, skip and flag; then the export and the
agreement statistics. Also writes the screenshots of ``docs/labelling.md``."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from alignkit.data.feedback import read_feedback
from alignkit.label import add_annotator, create_app, export_labels, write_queue
from alignkit.label.app import close_app
from alignkit.label.cli import make_label_server
from alignkit.label.stats import label_stats
from tests.conftest import REPO, SMOKE, run_cli

CHROMIUM = shutil.which("chromium")
# CI installs the browser (scripts/bootstrap.sh dev does where it can): there a missing one is
# a failure, not a skip.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"),
        reason="needs the system chromium (Debian's package: apt-get install chromium)",
    ),
]
IMAGES = REPO / "docs" / "images"

ITEMS: list[dict[str, Any]] = [
    {
        "id": "arith-1",
        "prompt": "User: What is 2 plus 3?\nAssistant:",
        "prompt_id": "arith-plus-2-3",
        "responses": ["5", "2 plus 3 is 6.", "The answer is 5: 2 + 3 = 5."],
    },
    {
        "id": "count-1",
        "prompt": "User: Count from 3 to 6.\nAssistant:",
        "prompt_id": "instruct-countup-3-6",
        "responses": ["3 4 5 6", "3 4 5", "Sure! Here you go:\n3, 4, 5, 6"],
    },
    {
        "id": "word-1",
        "prompt": "User: Write the word 'apple' backwards.\nAssistant:",
        "prompt_id": "instruct-reverse-apple",
        "responses": ["elppa", "<img src=x onerror=alert(1)> apple", "elpa"],
    },
]
RESPONSES = {item["id"]: item["responses"] for item in ITEMS}
# Ranks (0 best) and ratings by original response index. The two annotators agree on
# arith-1 and word-1 and disagree on one pair of count-1.
ANA = {
    "arith-1": ([1, 2, 0], [5, 1, 7]),
    "count-1": ([0, 2, 1], [7, 2, 5]),
    "word-1": ([0, 2, 1], [7, 1, 3]),
}
BEN = {
    "arith-1": ([1, 2, 0], [6, 1, 7]),
    "count-1": ([1, 2, 0], [5, 1, 6]),
    "word-1": ([0, 2, 1], [7, 1, 2]),
}


@pytest.fixture(scope="module")
def timer() -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"\nbrowser tests: {time.perf_counter() - start:.1f} s")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The app of a fresh queue, served on a free port in a thread: (base URL, queue)."""
    queue_dir = write_queue(tmp_path / "queue", ITEMS, labels_per_item=2)
    app = create_app(queue_dir, secret_key="browser-test")
    httpd = make_label_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", queue_dir
    httpd.shutdown()
    thread.join(timeout=10)
    close_app(app)


@pytest.fixture(scope="module")
def browser(timer: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def open_as(browser: Any, base: str, queue_dir: Path, name: str) -> Any:
    """A page logged in as a new annotator ``name`` (its own cookies)."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("dialog", lambda dialog: pytest.fail(f"a page dialog opened: {dialog.message}"))
    page.goto(f"{base}/?token={add_annotator(queue_dir, name)}")
    assert "token" not in page.url  # the login redirect cleans the address
    return page


def item_on(page: Any) -> str | None:
    locator = page.locator("input[name=item_id]").first
    return locator.get_attribute("value") if locator.count() else None


def shown_order(page: Any, item_id: str) -> list[int]:
    """Original response indices of the cards, top to bottom."""
    texts = page.locator("#responses .response-text").all_inner_texts()
    return [RESPONSES[item_id].index(text) for text in texts]


def positions(page: Any) -> list[int]:
    """The cards' form positions (data-pos), top to bottom."""
    return [
        int(p)
        for p in page.locator("#responses .card").evaluate_all(
            "cards => cards.map(c => c.dataset.pos)"
        )
    ]


def fill_by_keyboard(page: Any, item_id: str, ranks: list[int], ratings: list[int]) -> None:
    """Arrows between cards, digits for ranks, Shift+digits for ratings, c for a critique."""
    order = shown_order(page, item_id)
    page.locator("#responses .card").first.focus()
    for n, original in enumerate(order):
        page.keyboard.press(f"Digit{ranks[original] + 1}")
        page.keyboard.press(f"Shift+Digit{ratings[original]}")
        if ranks[original] == 2:  # critique the worst response
            page.keyboard.press("c")
            page.keyboard.type("Wrong or incomplete.")
            page.keyboard.press("Escape")
        if n + 1 < len(order):
            page.keyboard.press("ArrowDown")


def fill_by_mouse(page: Any, item_id: str, ranks: list[int] | None, ratings: list[int]) -> None:
    """Rank menus (unless ``ranks`` is None) and rating buttons, clicked."""
    for pos, original in zip(positions(page), shown_order(page, item_id), strict=True):
        if ranks is not None:
            page.select_option(f"#rank-{pos}", str(ranks[original] + 1))
        page.locator(f"#rating-{pos}-{ratings[original]} + span").click()


def rank_menus(page: Any, item_id: str) -> list[int]:
    """The ranks the menus show now, by original response index (0 best)."""
    ranks = [0] * len(RESPONSES[item_id])
    for pos, original in zip(positions(page), shown_order(page, item_id), strict=True):
        ranks[original] = int(page.locator(f"#rank-{pos}").input_value()) - 1
    return ranks


def drag_into_order(page: Any, item_id: str, ranks: list[int]) -> None:
    """Drag cards by their handles until the list runs best to worst (ranks follow)."""
    want = sorted(range(len(ranks)), key=lambda i: ranks[i])
    for target in range(len(want)):
        current = shown_order(page, item_id)
        if current[target] == want[target]:
            continue
        cards = page.locator("#responses .card")
        source = cards.nth(current.index(want[target])).locator(".handle")
        source.drag_to(cards.nth(target), target_position={"x": 40, "y": 4})
    assert shown_order(page, item_id) == want
    assert rank_menus(page, item_id) == ranks  # dropping set every rank to its place


def submit_with(page: Any, key: str | None = None, button: str | None = None) -> None:
    with page.expect_navigation():
        if key:
            page.keyboard.press(key)
        else:
            page.click(button)


def label_everything(page: Any, labels: dict[str, tuple[list[int], list[int]]], how: str) -> list:
    """Label every item the page is given; ``how``: keyboard, mouse, or drag (+ mouse)."""
    done = []
    while (item_id := item_on(page)) is not None:
        ranks, ratings = labels[item_id]
        if how == "keyboard" or (how == "mixed" and len(done) % 2 == 0):
            fill_by_keyboard(page, item_id, ranks, ratings)
            if not done:
                page.locator("#responses .card").first.focus()
                page.screenshot(path=str(IMAGES / "labelling-rank.png"), full_page=True)
            submit_with(page, key="Enter")
        else:
            if how == "drag":
                drag_into_order(page, item_id, ranks)
                fill_by_mouse(page, item_id, None, ratings)
            else:
                fill_by_mouse(page, item_id, ranks, ratings)
            submit_with(page, button="#submit-button")
        assert page.locator("#errors").count() == 0, page.locator("#errors").inner_text()
        done.append(item_id)
        assert len(done) <= len(ITEMS), f"an item came twice: {done}"
    return done


def test_two_annotators_label_undo_and_export(
    browser: Any, server: tuple[str, Path], tmp_path: Path, sft_run: Path
) -> None:
    start = time.perf_counter()
    base, queue_dir = server
    IMAGES.mkdir(parents=True, exist_ok=True)
    ana = open_as(browser, base, queue_dir, "ana")
    ben = open_as(browser, base, queue_dir, "ben")
    assert item_on(ana) == "arith-1" and item_on(ben) == "count-1"  # not the same item

    assert sorted(label_everything(ana, ANA, "mixed")) == sorted(RESPONSES)
    assert ana.locator("#done").is_visible()

    # ben labels by dragging; the first time round he gets count-1 wrong on purpose, undoes
    # it with the keyboard and labels it again.
    item_id = item_on(ben)
    assert item_id == "count-1"
    wrong = ([2, 1, 0], [1, 3, 5])
    drag_into_order(ben, item_id, wrong[0])
    fill_by_mouse(ben, item_id, wrong[0], wrong[1])
    submit_with(ben, button="#submit-button")
    assert item_on(ben) != "count-1"
    submit_with(ben, key="u")
    assert item_on(ben) == "count-1" and "Undid your last label" in ben.content()
    assert sorted(label_everything(ben, BEN, "drag")) == sorted(RESPONSES)

    ana.goto(f"{base}/progress")
    assert ana.locator("#overall").inner_text().startswith("3 of 3 items done")
    ana.screenshot(path=str(IMAGES / "labelling-progress.png"), full_page=True)

    paths = export_labels(queue_dir, tmp_path / "export")
    rankings = read_feedback(paths["rankings"], rating_scale=7)
    assert [r.prompt_id for r in rankings] == [i["prompt_id"] for i in ITEMS for _ in "ab"]
    assert all(r.responses == RESPONSES[i["id"]] for r, i in zip(rankings[::2], ITEMS, strict=True))
    rows = [json.loads(line) for line in paths["rankings"].read_text().splitlines()]
    got = {(row["item_id"], row["annotator"]): row["ranks"] for row in rows}
    # ana is a1, ben a2; ben's undone label of count-1 is gone.
    assert got == {
        **{(item_id, "a1"): ranks for item_id, (ranks, _) in ANA.items()},
        **{(item_id, "a2"): ranks for item_id, (ranks, _) in BEN.items()},
    }
    ratings = read_feedback(paths["ratings"], rating_scale=7)
    assert len(ratings) == 18
    assert "Wrong or incomplete." in paths["critiques"].read_text()

    stats = label_stats(queue_dir)
    # count-1: ana 0 > 2 > 1, ben 2 > 0 > 1: they differ on (0, 2) only -> 8 of 9 pairs.
    assert (stats.ranking.agree, stats.ranking.shared) == (8, 9)
    assert stats.ranking.value is not None and stats.ranking.value < 1
    assert stats.alpha_interval is not None and 0.5 < stats.alpha_interval < 1
    print(f"\ntwo annotators, undo and export: {time.perf_counter() - start:.1f} s")

    # The export is feedback the reward-model stage reads as it is.
    proc = run_cli(
        [
            "stage=reward_model",
            *SMOKE,
            f"reward_model.data=[{paths['rankings']}]",
            f"reward_model.backbone={sft_run / 'sft'}",
            "reward_model.eval_fraction=0.3",
            f"run_dir={tmp_path / 'rm'}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["rm_train_groups"] > 0 and 0 <= summary["rm_heldout_accuracy"] <= 1


def test_skip_flag_help_and_errors_by_keyboard(browser: Any, server: tuple[str, Path]) -> None:
    start = time.perf_counter()
    base, queue_dir = server
    page = open_as(browser, base, queue_dir, "cleo")
    page.keyboard.press("?")
    assert page.locator("#help").is_visible()
    page.keyboard.press("?")
    assert not page.locator("#help").is_visible()

    # Enter with nothing filled in: the server lists what is missing, the item stays.
    submit_with(page, key="Enter")
    assert "Response A: choose a rank (1 = best)." in page.locator("#errors").inner_text()
    assert item_on(page) == "arith-1"

    submit_with(page, key="s")  # skip arith-1
    assert item_on(page) == "count-1" and "Skipped." in page.content()
    page.keyboard.press("f")
    assert page.locator("#flag-hint").is_visible()
    page.keyboard.press("Escape")  # cancel
    assert not page.locator("#flag-hint").is_visible()
    page.keyboard.press("f")
    submit_with(page, key="Digit2")  # flag count-1 as unclear
    assert item_on(page) == "word-1" and "Flagged as unclear." in page.content()
    # Data is text: the markup in a response is shown, not run (no dialog opened).
    assert "<img src=x onerror=alert(1)> apple" in page.locator("#responses").inner_text()

    submit_with(page, key="u")  # undo the flag
    assert item_on(page) == "count-1"
    page.keyboard.press("f")
    submit_with(page, key="Digit1")  # flag it as unsafe instead
    flags = label_stats(queue_dir)
    assert (flags.skips, flags.flags, flags.flag_reasons) == (1, 1, {"unsafe": 1})
    print(f"\nskip, flag, help and errors: {time.perf_counter() - start:.1f} s")
