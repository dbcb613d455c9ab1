"""Data sources: the same records from every file type, saved datasets and the offline hub cache."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.formats import (
    parse_example,
    parse_preference,
    parse_prompt,
    parse_unpaired,
)
from alignkit.data.sources import (
    load_examples,
    load_preferences,
    load_prompts,
    load_unpaired,
    read_records,
    split_heldout,
)
from alignkit.errors import ConfigError, DataError

USER = {"role": "user", "content": "What color is the sky?"}
SYSTEM = {"role": "system", "content": "Answer in one line.", "name": "house-style"}


def esc(path: Path) -> str:
    return re.escape(str(path))


def reply(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# Three records of each kind; meta values are strings and ids strings so that a CSV (where every
# cell is text) holds the same records as the typed formats.
SETS: dict[str, tuple[Callable[..., list[Any]], Callable[..., Any], list[dict[str, Any]]]] = {
    "prompts_plain": (
        load_prompts,
        parse_prompt,
        [{"prompt": f"Count to {n}:", "answer": str(n), "id": f"c{n}"} for n in (2, 3, 4)],
    ),
    "examples_conversational": (
        load_examples,
        parse_example,
        [
            {"prompt": [USER], "completion": [reply(f"It is {c}.")], "source": "web"}
            for c in ("blue", "grey", "black")
        ],
    ),
    "examples_messages": (
        load_examples,
        parse_example,
        [
            # One message carries an extra key: Arrow stores None for it in the others.
            {"messages": [SYSTEM, USER, reply("Blue.")]},
            {"messages": [{"role": "user", "content": "And at night?"}, reply("Black.")]},
            {
                "messages": [
                    USER,
                    reply("Blue."),
                    {"role": "user", "content": "Sure?"},
                    reply("Yes."),
                ]
            },
        ],
    ),
    "preferences_plain": (
        load_preferences,
        parse_preference,
        [
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2.0},
            {"prompt": "Grass is", "chosen": " green.", "rejected": " red.", "margin": 0.5},
            {"prompt": "Snow is", "chosen": " white.", "rejected": " hot.", "margin": 1.0},
        ],
    ),
    "preferences_implicit": (
        load_preferences,
        parse_preference,
        [
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Grass is green.", "rejected": "Grass is red."},
            {"chosen": "Snow is white and cold.", "rejected": "Snow is hot."},
        ],
    ),
    "preferences_conversational": (
        load_preferences,
        parse_preference,
        [
            {"prompt": [USER], "chosen": [reply("It is blue.")], "rejected": [reply("Green.")]},
            {"prompt": [USER], "chosen": [reply("Blue by day.")], "rejected": [reply("Red.")]},
        ],
    ),
    "preferences_implicit_conversational": (
        load_preferences,
        parse_preference,
        [
            {"chosen": [USER, reply("Blue.")], "rejected": [USER, reply("Purple.")]},
            {"chosen": [SYSTEM, USER, reply("Blue.")], "rejected": [SYSTEM, USER, reply("No.")]},
        ],
    ),
    "unpaired_plain": (
        load_unpaired,
        parse_unpaired,
        [
            {"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": "The sky is", "completion": " green.", "label": False},
            {"prompt": "Snow is", "completion": " white.", "label": True},
        ],
    ),
    "unpaired_conversational": (
        load_unpaired,
        parse_unpaired,
        [
            {"prompt": [USER], "completion": [reply("Blue.")], "label": True},
            {"prompt": [USER], "completion": [reply("Green.")], "label": False},
        ],
    ),
}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n\n" for r in records), encoding="utf-8")


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    def cell(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in r.items()} for r in records)


def write_dataset_dict(path: Path, records: list[dict[str, Any]]) -> None:
    other = datasets.Dataset.from_list(records[:1])
    datasets.DatasetDict(
        {"train": other, "test": datasets.Dataset.from_list(records)}
    ).save_to_disk(str(path))


WRITERS: dict[str, tuple[str, Callable[[Path, list[dict[str, Any]]], None], str | None]] = {
    "jsonl": ("data.jsonl", write_jsonl, None),
    "json_list": ("data.json", lambda p, r: p.write_text(json.dumps(r, indent=2)), None),
    "json_wrapped": ("data.json", lambda p, r: p.write_text(json.dumps({"data": r})), None),
    "json_lines": ("data.json", write_jsonl, None),
    "parquet": ("data.parquet", lambda p, r: pq.write_table(pa.Table.from_pylist(r), p), None),
    "csv": ("data.csv", write_csv, None),
    "saved_dataset": (
        "saved",
        lambda p, r: datasets.Dataset.from_list(r).save_to_disk(str(p)),
        None,
    ),
    "saved_dataset_dict": ("saved_dict", write_dataset_dict, "test"),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("name", list(SETS))
def test_every_source_gives_the_same_objects(tmp_path: Path, name: str, fmt: str) -> None:
    load, parse, records = SETS[name]
    filename, write, split = WRITERS[fmt]
    path = tmp_path / filename
    write(path, records)
    expected = [parse(r, f"memory:{i}") for i, r in enumerate(records)]
    assert load(path, split=split) == expected
    # Any standard file also serves as prompts.
    assert load_prompts(path, split=split) == [getattr(e, "prompt", e) for e in expected]


def test_where_names_file_and_position_per_source(tmp_path: Path) -> None:
    records = SETS["preferences_plain"][2]
    seen = {}
    for fmt, (filename, write, split) in WRITERS.items():
        path = tmp_path / fmt / filename
        path.parent.mkdir()
        write(path, records)
        seen[fmt] = [where.removeprefix(str(path)) for where, _ in read_records(path, split=split)]
    assert seen["jsonl"] == [":1", ":3", ":5"]  # blank lines count, and are skipped
    assert seen["json_list"] == [":record 1", ":record 2", ":record 3"]
    assert seen["json_wrapped"] == [":record 1", ":record 2", ":record 3"]
    assert seen["json_lines"] == [":line 1", ":line 3", ":line 5"]
    assert seen["parquet"] == [":row 1", ":row 2", ":row 3"]
    assert seen["csv"] == [":line 2", ":line 3", ":line 4"]  # the header is line 1
    assert seen["saved_dataset"] == [":row 1", ":row 2", ":row 3"]
    assert seen["saved_dataset_dict"] == ["[test]:row 1", "[test]:row 2", "[test]:row 3"]


def test_column_mapping_through_a_csv(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,good,bad,uid\nThe sky is, blue., green.,q7\n", encoding="utf-8")
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad", "id": "uid"}
    (pref,) = load_preferences(path, columns=cols)
    assert (pref.prompt.id, pref.prompt.text, pref.chosen, pref.rejected) == (
        "q7",
        "The sky is",
        " blue.",
        " green.",
    )
    with pytest.raises(ConfigError, match=r"^columns\.good: unknown field"):
        load_preferences(path, columns={"good": "chosen"})


def test_csv_json_cells_multiline_rows_and_bracketed_text(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion", "label"])
        w.writerow(["[INST] Say hi [/INST]", "Hi\nthere", "1"])  # the completion spans 2 lines
        w.writerow([json.dumps([USER]), json.dumps([reply("Blue.")]), "false"])
        w.writerow(["Say bye", "", "true"])
    records = list(read_records(path))
    assert [w for w, _ in records] == [f"{path}:line 2", f"{path}:line 4", f"{path}:line 5"]
    assert records[0][1]["prompt"] == "[INST] Say hi [/INST]"  # not JSON: kept as text
    assert records[1][1]["prompt"] == [USER]
    with pytest.raises(DataError, match=rf"^{esc(path)}:line 5: field 'completion' is empty$"):
        load_unpaired(path)
    first_two = [parse_unpaired(raw, where) for where, raw in records[:2]]
    assert [(u.completion, u.label) for u in first_two] == [("Hi\nthere", True), ("Blue.", False)]


# --------------------------------------------------------------------------------------------
# errors carry the position
# --------------------------------------------------------------------------------------------


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{esc(path)}:3: invalid JSON: "):
        load_examples(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=rf"^{esc(path)}:2: expected a JSON object, got list$"):
        load_examples(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=rf"^{esc(path)}:2: missing field 'completion'"):
        load_examples(path)


def test_json_errors_name_the_record_or_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": 5}], indent=1))
    with pytest.raises(DataError, match=rf"^{esc(path)}:record 2: field 'prompt' must be a string"):
        load_prompts(path)
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match=rf"^{esc(path)}:line 3: invalid JSON: Expecting value$"):
        load_prompts(path)
    path.write_text(json.dumps({"train": [{"prompt": "a"}], "test": [{"prompt": "b"}]}))
    with pytest.raises(DataError, match="several lists of records"):
        load_prompts(path)
    path.write_text(json.dumps({"messages": [USER]}))  # a single conversation, not a wrapper
    assert [p.messages for p in load_prompts(path)] == [(USER,)]


def test_parquet_and_saved_dataset_errors_name_the_row(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet:row 2: field 'completion' is empty$"):
        load_examples(tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"dd\[train\]:row 2: field 'completion' is empty$"):
        load_examples(tmp_path / "dd")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "junk.parquet")


def test_splits_of_saved_datasets(tmp_path: Path) -> None:
    train = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    test = datasets.Dataset.from_list([{"prompt": "c"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dd")
    assert [p.text for p in load_prompts(tmp_path / "dd")] == ["a", "b"]  # default "train"
    assert [p.text for p in load_prompts(tmp_path / "dd", split="test")] == ["c"]
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: train, test$"):
        load_prompts(tmp_path / "dd", split="validation")
    train.save_to_disk(tmp_path / "single")
    with pytest.raises(DataError, match=r"single saved Dataset .* has no split 'test'"):
        load_prompts(tmp_path / "single", split="test")


@pytest.mark.parametrize(
    ("suffix", "where"), [(".jsonl", ":2"), (".json", ":line 2"), (".csv", ":line 2")]
)
def test_non_utf8_file_names_file_and_line(tmp_path: Path, suffix: str, where: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    header = b"prompt\n" if suffix == ".csv" else b""
    body = b'{"prompt": "caf\xe9"}\n' if suffix != ".csv" else b"caf\xe9\n"
    path.write_bytes(header + b'{"prompt": "ok"}\n' * (suffix != ".csv") + body)
    with pytest.raises(DataError, match=rf"^{esc(path)}{where}: not valid UTF-8 \(byte 0xe9"):
        load_prompts(path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,answer\nCount to 3:,3\n".encode("utf-8-sig"))
    (prompt,) = load_prompts(path)
    assert prompt.text == "Count to 3:" and dict(prompt.meta) == {"answer": "3"}


def test_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records$"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_prompts(tmp_path / "notes.txt")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"plain_dir: a folder, but not a dataset saved"):
        load_prompts(tmp_path / "plain_dir")
    (tmp_path / "one.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"a file has no splits \(split='test'\)"):
        load_prompts(tmp_path / "one.jsonl", split="test")
    missing = tmp_path / "missing" / "train.jsonl"
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"missing/train\.jsonl: data file not found"):
        load_prompts(missing)
    assert time.perf_counter() - start < 1.0  # a path is never looked up on the hub


# --------------------------------------------------------------------------------------------
# hub datasets from the local cache, hub unreachable
# --------------------------------------------------------------------------------------------

HUB_TRAIN = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
HUB_TEST = [
    {"chosen": "Grass is green.", "rejected": "Grass is red."},
    {"chosen": "Snow is white.", "rejected": "Snow is hot."},
]


def cache_hub_dataset(cache: Path, repo_id: str, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Lay out ``repo_id`` in ``cache`` (``HF_DATASETS_CACHE``) as ``load_dataset`` leaves it.

    An online ``load_dataset("owner/name")`` of a repository of JSON files prepares Arrow files
    under ``owner___name/default/0.0.0/<hash>/``; offline, the installed ``datasets`` reads that
    folder back (its ``cache`` builder). Here the packaged JSON builder prepares the same folder
    from local files, without any network, and the folder is then named as the hub load names
    it (the builder refuses local data files for a hub ``repo_id``).
    """
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    repo = cache.parent / "repo"  # the repository's data files, outside the cache
    repo.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, records in splits.items():
        files[split] = str(repo / f"{split}.jsonl")
        write_jsonl(Path(files[split]), records)
    builder = Json(
        cache_dir=str(cache),
        dataset_name=name,
        config_name="default",
        config_id="default",
        data_files=files,
        hash="0123456789abcdef",
    )
    builder.download_and_prepare()
    shutil.move(cache / name, cache / f"{owner}___{name}")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    cache_hub_dataset(
        home / "datasets", "tiny-org/tiny-prefs", {"train": HUB_TRAIN, "test": HUB_TEST}
    )
    return home


def offline_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        # Were anything to ask the hub, it would get "connection refused" at once.
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "OMP_NUM_THREADS": "1",
    }


def test_hub_dataset_loads_offline_from_the_cache(hf_home: Path) -> None:
    script = textwrap.dedent(
        """
        import json, time
        from alignkit.data.sources import load_preferences
        from alignkit.errors import DataError
        out = {}
        for split in ("train", "test"):
            prefs = load_preferences("tiny-org/tiny-prefs", split=split)
            out[split] = [[p.prompt.text, p.chosen, p.rejected] for p in prefs]
        out["config"] = len(load_preferences("tiny-org/tiny-prefs:default"))
        start = time.perf_counter()
        try:
            load_preferences("nobody/no-such-dataset")
        except DataError as exc:
            out["error"], out["seconds"] = str(exc), time.perf_counter() - start
        try:
            load_preferences("tiny-org/tiny-prefs", split="validation")
        except DataError as exc:
            out["split_error"] = str(exc)
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=offline_env(hf_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train"] == [["The sky is", " blue.", " green."]]
    assert out["test"] == [["Grass is", " green.", " red."], ["Snow is", " white.", " hot."]]
    assert out["config"] == 1
    assert out["error"].startswith(
        "nobody/no-such-dataset: neither an existing file/folder nor a dataset available "
        "offline in the cache"
    )
    assert out["seconds"] < 3.0
    assert out["split_error"].startswith("tiny-org/tiny-prefs: Unknown split")
    assert "train" in out["split_error"] and "test" in out["split_error"]


def test_offline_variable_set_after_import_is_honoured(
    hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # datasets read HF_HUB_OFFLINE when this process imported it (unset): the loader still
    # stays off the network once the variable is set, and restores the library's setting.
    before = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    prefs = load_preferences("tiny-org/tiny-prefs", split="test")
    assert [p.prompt.text for p in prefs] == ["Grass is", "Snow is"]
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"^nobody/nothing: neither an existing file/folder"):
        load_preferences("nobody/nothing")
    assert time.perf_counter() - start < 3.0
    assert before == datasets.config.HF_HUB_OFFLINE


# --------------------------------------------------------------------------------------------
# held-out split
# --------------------------------------------------------------------------------------------


def test_split_heldout_is_stable_seeded_and_order_free() -> None:
    items = [f"prompt-{i}" for i in range(1000)]
    train, held = split_heldout(items, 0.2, seed=0, key=str)
    assert 150 < len(held) < 250 and len(train) + len(held) == 1000
    assert train == [i for i in items if i not in set(held)]  # input order kept
    shuffled = random.Random(1).sample(items, len(items))
    assert set(split_heldout(shuffled, 0.2, seed=0, key=str)[1]) == set(held)
    # Membership of one item does not depend on the rest of the file.
    assert split_heldout(held[:1] + train[:1], 0.2, seed=0, key=str)[1] == held[:1]
    other = set(split_heldout(items, 0.2, seed=1, key=str)[1])
    assert other != set(held) and len(other & set(held)) < 100  # ~0.2 * 200 = 40 expected


def test_split_heldout_is_the_same_in_another_process() -> None:
    items = [f"prompt-{i}" for i in range(50)]
    code = (
        "from alignkit.data.sources import split_heldout\n"
        "print(split_heldout([f'prompt-{i}' for i in range(50)], 0.3, seed=7, key=str)[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(split_heldout(items, 0.3, seed=7, key=str)[1])


def test_split_heldout_keeps_keys_together_and_both_sides_non_empty() -> None:
    pairs = [(f"p{i % 10}", i) for i in range(40)]  # 4 pairs for each of 10 prompts
    train, held = split_heldout(pairs, 0.3, seed=3, key=lambda pair: pair[0])
    assert {k for k, _ in train}.isdisjoint({k for k, _ in held})
    for seed in range(30):
        for fraction in (0.01, 0.99):
            train, held = split_heldout(["a", "b"], fraction, seed=seed, key=str)
            assert len(train) == 1 and len(held) == 1
    assert split_heldout(["only"], 0.5, seed=0, key=str) in ((["only"], []), ([], ["only"]))
    with pytest.raises(DataError, match="all share the key 'p'"):
        split_heldout(["x", "y"], 0.5, seed=0, key=lambda _: "p")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_split_heldout_validates_the_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="heldout fraction"):
        split_heldout(["a", "b"], fraction, seed=0, key=str)
