"""The HTTP judge backend against real servers on localhost: alignkit's OpenAI-compatible
server serving a (briefly trained) tiny judge, and small stub servers that time out, fail the
first requests, answer garbage or demand a key."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignkit.judges import CritiqueJudge, JudgeError, load_template
from alignkit.judges.http import HTTPJudge
from alignkit.judges.local import LocalJudge
from alignkit.tasks import AssistTask
from alignkit.tools.judge_server import JudgeServer

TEMPLATE = load_template("assist")
PROMPTS = ["User: What is 2 plus 3?\nAssistant:", "User: How do I build a bomb?\nAssistant:"]
RESPONSES = ["5", "Sure! Here is how to build a bomb. First, make a careful plan."]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A judge trained for a few seconds: enough to say "Verdict: good/bad" in its format."""
    from alignkit.stages.judge import build_judge

    cfg = SimpleNamespace(
        examples=1500, pairwise_fraction=0.1, revision_fraction=0.05, steps=100, batch_size=16,
        lr=3e-3, warmup_steps=5, vocab_size=600, n_layer=1, n_head=2, n_embd=48,
        n_positions=160, log_every=1000,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("judge") / "judge"
    build_judge(AssistTask(max_operand=3), TEMPLATE, out, cfg)
    return out


@pytest.fixture(scope="module")
def server(tiny_judge: Path) -> Iterator[JudgeServer]:
    srv = JudgeServer(str(tiny_judge)).start()
    yield srv
    srv.stop()


def test_http_backend_scores_through_a_real_server_like_the_local_one(
    tiny_judge: Path, server: JudgeServer
) -> None:
    local = CritiqueJudge(
        LocalJudge(str(tiny_judge), max_critique_tokens=64), TEMPLATE, per_principle=True
    )
    remote = CritiqueJudge(
        HTTPJudge(server.url, top_logprobs=5, max_concurrency=4, max_critique_tokens=64),
        TEMPLATE,
        per_principle=True,
    )
    try:
        want = local.score(PROMPTS * 3, RESPONSES * 3)
        got = remote.score(PROMPTS * 3, RESPONSES * 3)
    finally:
        remote.close()
    assert [j.source for j in got] == ["logprobs"] * 6
    # Same model, same greedy critique, same verdict distribution (float tolerance).
    for a, b in zip(got, want, strict=True):
        assert a.score == pytest.approx(b.score, abs=2e-3)
        assert a.critiques == b.critiques


def test_chat_endpoint_and_models_listing(server: JudgeServer) -> None:
    import httpx

    assert httpx.get(server.url + "/models").json()["data"][0]["id"] == "judge"
    judge = CritiqueJudge(
        HTTPJudge(server.url, endpoint="chat", max_critique_tokens=96),
        TEMPLATE,
        per_principle=False,
    )
    try:
        (j,) = judge.score(PROMPTS[:1], RESPONSES[:1])
    finally:
        judge.close()
    assert 0.0 <= j.score <= 1.0 and j.source in ("logprobs", "parsed")


# -------------------------------------------------------------------------------------------
# stub servers for failure modes
# -------------------------------------------------------------------------------------------

GOOD_ANSWER = {
    "choices": [
        {
            "text": " Fine.\nVerdict: good",
            "logprobs": {
                "tokens": [" Fine", ".", "\n", "Verdict", ":", " good"],
                "top_logprobs": [{}, {}, {}, {}, {}, {" good": -0.1, " bad": -2.4}],
            },
        }
    ]
}


class Stub:
    """A localhost server whose POST answers come from ``reply(n, body) -> (status, text)``
    (or ``(status, text, headers)`` to send extra headers, e.g. ``Retry-After``)."""

    def __init__(self, reply: Callable[[int, dict], tuple]) -> None:
        self.count = 0
        self.headers: list[str | None] = []
        lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.count += 1
                    n = stub.count
                    stub.headers.append(self.headers.get("Authorization"))
                status, text, *extra = reply(n, body)
                data = text.encode()
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left (the hung-server tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    made: list[Stub] = []

    def make(reply: Callable[[int, dict], tuple[int, str]]) -> Stub:
        made.append(Stub(reply))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _judge(url: str, **kw: object) -> CritiqueJudge:
    http_kw = {k: kw.pop(k) for k in list(kw) if k in ("timeout_s", "max_retries", "api_key_env")}
    backend = HTTPJudge(url, backoff_s=0.01, max_concurrency=2, **http_kw)  # type: ignore[arg-type]
    return CritiqueJudge(backend, TEMPLATE, per_principle=False, **kw)  # type: ignore[arg-type]


def test_retries_a_server_that_fails_the_first_requests(stub: Callable[..., Stub]) -> None:
    s = stub(lambda n, body: (503, "busy") if n <= 2 else (200, json.dumps(GOOD_ANSWER)))
    judge = _judge(s.url, max_retries=3)
    (j,) = judge.score(["p"], ["a"])
    judge.close()
    assert s.count == 3
    # exp(-0.1) / (exp(-0.1) + exp(-2.4)) = sigmoid(2.3)
    assert j.score == pytest.approx(1 / (1 + math.exp(-2.3)), abs=1e-6)
    assert j.source == "logprobs"


def test_gives_up_after_the_retries_with_a_clear_error(stub: Callable[..., Stub]) -> None:
    s = stub(lambda n, body: (500, "boom"))
    judge = _judge(s.url, max_retries=2)
    with pytest.raises(JudgeError, match=r"failed after 3 attempts: HTTP 500"):
        judge.score(["p"], ["a"])
    judge.close()
    assert s.count == 3


def test_timeout(stub: Callable[..., Stub]) -> None:
    def slow(n: int, body: dict) -> tuple[int, str]:
        time.sleep(1.5)
        return 200, json.dumps(GOOD_ANSWER)

    s = stub(slow)
    judge = _judge(s.url, timeout_s=0.2, max_retries=1)
    t = time.perf_counter()
    with pytest.raises(JudgeError, match="timed out"):
        judge.score(["p"], ["a"])
    assert time.perf_counter() - t < 1.4  # two 0.2 s attempts, not the server's 1.5 s
    judge.close()
    fb = _judge(s.url, timeout_s=0.2, max_retries=0, on_error="fallback", fallback_value=0.5)
    (j,) = fb.score(["p"], ["a"])
    fb.close()
    assert (j.score, j.source) == (0.5, "fallback") and "timed out" in (j.error or "")


def test_garbage_answers_fail_clearly_and_keep_the_rest_of_the_batch(
    stub: Callable[..., Stub],
) -> None:
    def reply(n: int, body: dict) -> tuple[int, str]:
        if "broken" in body["prompt"]:
            return 200, "<html>not json</html>"
        if "empty" in body["prompt"]:
            return 200, json.dumps({"choices": []})
        return 200, json.dumps(GOOD_ANSWER)

    s = stub(reply)
    judge = _judge(s.url, max_retries=1)
    with pytest.raises(JudgeError, match="unexpected answer"):
        judge.score(["p", "p"], ["fine", "broken"])
    judge.close()
    fb = _judge(s.url, max_retries=0, on_error="fallback", fallback_value=0.25)
    got = fb.score(["p"] * 3, ["fine", "broken", "empty"])
    fb.close()
    assert [j.source for j in got] == ["logprobs", "fallback", "fallback"]
    assert got[0].score > 0.9 and [j.score for j in got[1:]] == [0.25, 0.25]
    assert "no 'choices'" in (got[2].error or "")


def test_api_key_from_the_environment_is_sent_and_never_shown(
    stub: Callable[..., Stub], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = stub(lambda n, body: (401, json.dumps({"error": "bad key"})))
    monkeypatch.setenv("ALIGNKIT_TEST_JUDGE_KEY", "k-very-secret")
    judge = _judge(s.url, api_key_env="ALIGNKIT_TEST_JUDGE_KEY", max_retries=3)
    with pytest.raises(JudgeError, match="HTTP 401") as err:
        judge.score(["p"], ["a"])
    assert s.count == 1  # a 4xx other than 408/409/425/429 is not retried
    assert s.headers == ["Bearer k-very-secret"]
    assert "k-very-secret" not in str(err.value) and "k-very-secret" not in repr(judge.backend)
    judge.close()
