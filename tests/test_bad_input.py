"""Bad input fails fast with one clear error: non-UTF-8 data files, corrupt weights, ratings off
the scale, out-of-range config values, missing model paths, and hung or throttling judges."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from alignkit.data import load_preferences, read_prompt_records, read_sft_pairs
from alignkit.data.feedback import load_feedback, read_feedback
from alignkit.errors import ConfigError, DataError
from alignkit.judges import JudgeError
from alignkit.judges.http import HTTPJudge, retry_after_s
from alignkit.models import (
    ModelLoadError,
    ScalarHeadModel,
    TinyModelSpec,
    build_tiny_model,
    load_causal_lm,
)
from alignkit.validate import check_config_ranges
from tests.test_judges_http import GOOD_ANSWER, Stub

LATIN1 = "caf\xe9".encode("latin-1")  # "café" as Latin-1: 0xe9 is not valid UTF-8 here


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test here may touch the network, even where the code under test would try.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------
# item 8: non-UTF-8 data files, corrupt weights
# --------------------------------------------------------------------------------------------


def _bad_utf8(path: Path, offset: int = 63) -> str:
    """Regex of the error for a Latin-1 byte at column 16 of line 2 (at ``offset`` in the file)."""
    where = re.escape(str(path))
    return rf"^{where}:2: not valid UTF-8 \(byte 0xe9 at column 16, file offset {offset}\)"


class _Record:
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> _Record:
        return cls()


def test_non_utf8_feedback_sft_and_prompt_files_name_file_line_and_offset(tmp_path: Path) -> None:
    pair = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'  # 48 bytes
    bad_pair = b'{"prompt": "' + LATIN1 + b'", "chosen": "b", "rejected": "c"}\n'
    feedback = tmp_path / "fb.jsonl"
    feedback.write_bytes(pair + bad_pair)
    with pytest.raises(DataError, match=_bad_utf8(feedback)):
        read_feedback(feedback)
    with pytest.raises(DataError, match=_bad_utf8(feedback)):
        load_feedback([tmp_path])  # a folder of *.jsonl
    sft = tmp_path / "sft.jsonl"
    demo = b'{"prompt": "a", "response": "b"}\n'  # 33 bytes
    sft.write_bytes(demo + b'{"prompt": "' + LATIN1 + b'", "response": "b"}\n')
    with pytest.raises(DataError, match=_bad_utf8(sft, 33 + 15)):
        read_sft_pairs(sft)
    with pytest.raises(DataError, match=_bad_utf8(sft, 33 + 15)):
        read_prompt_records(sft, _Record)
    # The standard-format readers: JSONL, JSON, CSV (lines counted with the header).
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"prefs{suffix}"
        path.write_bytes(pair + bad_pair)
        with pytest.raises(DataError, match=r"not valid UTF-8 .*file offset 63\)"):
            load_preferences(str(path))
    csv = tmp_path / "prefs.csv"
    csv.write_bytes(b"prompt,chosen,rejected\na,b,c\n" + LATIN1 + b",b,c\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(csv))}:line 3: .*file offset 32\)"):
        load_preferences(str(csv))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=32)
    return build_tiny_model(tmp_path_factory.mktemp("m") / "model", ["hello world"] * 20, spec)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(tiny_model: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 8)
    pattern = rf"weights file {re.escape(str(weights))} is corrupt or truncated \(.*header"
    with pytest.raises(ModelLoadError, match=pattern):
        load_causal_lm(folder)
    with pytest.raises(ModelLoadError, match=pattern):
        ScalarHeadModel.from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# item 9: ratings off the scale, config ranges, missing model paths
# --------------------------------------------------------------------------------------------


def test_ratings_outside_the_scale_are_rejected_with_file_line_and_range(tmp_path: Path) -> None:
    ok = {"prompt": "p", "response": "a", "score": 7, "attributes": {"helpful": 1}}
    path = tmp_path / "ratings.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "score": 9}) + "\n")
    where = re.escape(f"{path}:2")
    with pytest.raises(DataError, match=rf"^{where}: field 'score' is 9, outside .* 1\.\.7"):
        read_feedback(path, rating_scale=7)
    with pytest.raises(DataError, match=rf"^{where}: field 'score' is 9, outside .* 1\.\.7"):
        load_feedback([path], rating_scale=7)
    assert len(read_feedback(path, rating_scale=10)) == 2
    path.write_text(json.dumps({**ok, "attributes": {"helpful": 0}}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'attributes.helpful' is 0, outside"):
        read_feedback(path, rating_scale=7)


@pytest.fixture(scope="module")
def compose() -> Iterator[Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from alignkit.cli import registration

    registration()
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        yield lambda overrides: hydra_compose("config", overrides=overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rl.prompts_per_step=0", "rl.prompts_per_step=0: must be >= 1"),
        ("rl.samples_per_prompt=0", "rl.samples_per_prompt=0: must be >= 1"),
        ("rl.max_new_tokens=0", "rl.max_new_tokens=0: must be >= 1"),
        ("rl.steps=-1", "rl.steps=-1: must be >= 0"),
        ("rl.temperature=0", "rl.temperature=0: must be > 0"),
        ("rl.top_p=1.5", r"rl.top_p=1.5: must be in \(0, 1\]"),
        ("rl.optim.lr=0", "rl.optim.lr=0: must be > 0"),
        ("sft.lr=-0.1", r"sft.lr=-0.1: must be > 0"),
        ("eval.num_prompts=0", "eval.num_prompts=0: must be >= 1"),
        ("feedback.samples_per_prompt=0", "feedback.samples_per_prompt=0: must be >= 1"),
        ("feedback.rating_scale=1", "feedback.rating_scale=1: must be >= 2"),
        ("algorithm.minibatch_size=0", "algorithm.minibatch_size=0: must be >= 1"),
    ],
)
def test_config_ranges_name_the_key(compose: Any, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_config_ranges(compose([override]))


@pytest.mark.parametrize("name", ["bradley_terry", "rm_ensemble", "plackett_luce"])
def test_every_selected_reward_gets_its_batch_ranges_checked(compose: Any, name: str) -> None:
    """``reward.*.batch_size``: one range for the key of every selected reward plugin."""
    cfg = compose([f"reward=[{name}]", f"reward.{name}.batch_size=0"])
    with pytest.raises(ConfigError, match=rf"^reward\.{name}\.batch_size=0: must be >= 1$"):
        check_config_ranges(cfg)
    check_config_ranges(compose([f"reward=[{name}]", f"reward.{name}.max_length=8"]))
    with pytest.raises(ConfigError, match=rf"^reward\.{name}\.max_length=0: must be >= 1$"):
        check_config_ranges(compose([f"reward=[{name}]", f"reward.{name}.max_length=0"]))


def test_default_and_experiment_configs_pass_the_range_check(compose: Any) -> None:
    for overrides in ([], ["algorithm=grpo"], ["experiment=smoke"], ["experiment=own_data"]):
        check_config_ranges(compose(overrides))
    check_config_ranges({"rl": {"steps": 0, "top_p": 1.0}, "feedback": {"num_prompts": None}})


def test_missing_model_paths_fail_at_once_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"model path does not exist: runs/nope"):
        load_causal_lm("runs/nope")  # a relative path under an existing folder, not a hub id
    with pytest.raises(ModelLoadError, match=r"model path does not exist: \./nope"):
        ScalarHeadModel.from_pretrained("./nope")
    for load in (load_causal_lm, ScalarHeadModel.from_pretrained):
        with pytest.raises(ModelLoadError, match=r"neither a local folder nor .*HF_HUB_OFFLINE"):
            load("no-such-org/no-such-model")
    assert time.perf_counter() - t < 5.0  # no network wait


# --------------------------------------------------------------------------------------------
# item 11: hung judge deadline, Retry-After, jitter
# --------------------------------------------------------------------------------------------


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    made: list[Stub] = []
    yield made
    for s in made:
        s.close()


def test_hung_judge_fails_the_step_by_the_deadline(stubs: list[Stub]) -> None:
    def hang(n: int, body: dict) -> tuple[int, str]:
        time.sleep(4.0)
        return 200, json.dumps(GOOD_ANSWER)

    stubs.append(Stub(hang))
    judge = HTTPJudge(
        stubs[0].url, timeout_s=0.3, max_retries=20, backoff_s=0.01, deadline_s=1.0,
        max_concurrency=2,
    )  # fmt: skip
    t = time.perf_counter()
    got = judge.critique(["a", "b", "c", "d", "e", "f"], "Verdict:", [" good", " bad"])
    elapsed = time.perf_counter() - t
    judge.close()
    assert all(isinstance(g, JudgeError) for g in got)
    assert "1s deadline" in str(got[0]) and "timed out" in str(got[0])
    # 21 attempts x 0.3 s per request and 3 waves of requests would be ~19 s.
    assert elapsed < 2.5


def test_retry_after_seconds_is_honoured_on_429(stubs: list[Stub]) -> None:
    def throttle(n: int, body: dict) -> tuple:
        if n == 1:
            return 429, "slow down", {"Retry-After": "1"}
        return 200, json.dumps(GOOD_ANSWER)

    stubs.append(Stub(throttle))
    judge = HTTPJudge(stubs[0].url, backoff_s=0.01, max_retries=2)
    t = time.perf_counter()
    (got,) = judge.critique(["p"], "Verdict:", [" good", " bad"])
    elapsed = time.perf_counter() - t
    judge.close()
    assert not isinstance(got, JudgeError) and stubs[0].count == 2
    assert elapsed >= 0.95  # the server's 1 s, not the 0.01 s backoff


def test_retry_after_past_the_deadline_fails_at_once(stubs: list[Stub]) -> None:
    stubs.append(Stub(lambda n, body: (503, "busy", {"Retry-After": "30"})))
    judge = HTTPJudge(stubs[0].url, backoff_s=0.01, max_retries=3, deadline_s=2.0)
    t = time.perf_counter()
    (got,) = judge.critique(["p"], "Verdict:", [" good", " bad"])
    judge.close()
    assert isinstance(got, JudgeError) and "Retry-After: 30s" in str(got)
    assert time.perf_counter() - t < 1.0 and stubs[0].count == 1


def test_retry_after_http_date_and_jittered_backoff() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    assert 3.5 < (retry_after_s(soon) or 0) <= 5.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_s("2.5") == 2.5 and retry_after_s("soon") is None
    judge = HTTPJudge("http://127.0.0.1:9/v1", backoff_s=1.0)
    random.seed(0)
    want = random.random()
    random.seed(0)
    delays = [judge._backoff(2) for _ in range(20)]
    assert random.random() == want  # jitter leaves the run's seeded RNG alone
    judge.close()
    assert all(2.0 <= d < 6.0 for d in delays) and len(set(delays)) > 1
