"""The HTTP judge backend: any OpenAI-compatible server (``/v1/completions`` or
``/v1/chat/completions``), such as ``python -m alignkit.tools.judge_server``, vLLM, ``transformers
serve`` or a hosted API.

* Requests run concurrently on a thread pool bounded by ``max_concurrency``.
* Each request has a timeout; timeouts, connection errors, HTTP 429 and 5xx, and answers that
  are not the expected JSON are retried up to ``max_retries`` times with exponential backoff
  ``backoff_s * 2**attempt`` times a random factor in [0.5, 1.5) (jitter, so that the requests
  of a batch that failed together do not all come back at the same instant). A 429 or 503
  with a ``Retry-After`` header (seconds or an HTTP date) waits what the server asked instead.
  Other 4xx answers (a wrong model name, a bad key) fail at once.
* ``deadline_s`` bounds one request with all its retries and waits. And once a request of a
  batch gave up on a hung or unreachable server (its last failure a timeout or a connection
  error), the batch's other requests give up at their next attempt instead of each waiting out
  its own timeouts: a hung judge fails a step in about ``deadline_s``, not
  ``timeout_s * (max_retries + 1)`` per wave of ``max_concurrency`` requests.
* The API key is read from the environment variable *named* by ``api_key_env``; the config
  never holds the key, and no error message, log line or repr contains it.
* A request that still fails is returned as a :class:`JudgeError` for that row; the
  :class:`~alignkit.judges.critic.CritiqueJudge` then raises or uses the configured fallback.

Verdict log-probs: the critique and verdict are generated in one request with
``logprobs``; the verdict is the first token after the verdict marker, and its
``top_logprobs`` give the options' log-probs. When the marker is missing from a completion,
a second request continues ``context + critique + verdict prefix`` for the verdict token. A
server without log-probs leaves the verdict to be parsed from the text.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from alignkit.errors import ConfigError
from alignkit.judges.base import JudgeError, RawVerdict, cut_critique
from alignkit.judges.verdict import match_option_logprobs

__all__ = ["DEFAULT_DEADLINE_S", "ENDPOINTS", "HTTPJudge", "read_api_key", "retry_after_s"]

ENDPOINTS = ("completions", "chat")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_RETRY_AFTER_STATUS = {429, 503}
DEFAULT_DEADLINE_S = 60.0
"""Seconds one request may take with its retries and waits (``judge.deadline_s``)."""


def retry_after_s(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delay-seconds or an HTTP date (RFC 9110).

    None when the header is absent or unreadable (then the backoff applies); a date in the
    past is 0.
    """
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass
class _Batch:
    """State shared by the requests of one ``critique``/``complete`` call."""

    hung: str | None = None
    """Why a request gave up on an unresponsive server; the others then stop retrying."""


def read_api_key(env_name: str | None, key: str = "judge.api_key_env") -> str | None:
    """The API key from the environment variable ``env_name`` (None when no name is given).

    The config holds only the variable's *name*: a value that is not a valid variable name
    (e.g. a pasted key) is refused, and the message does not repeat it.
    """
    if not env_name:
        return None
    if not _ENV_NAME.match(env_name):
        raise ConfigError(
            f"{key} must be the NAME of an environment variable holding the API key (e.g. "
            "OPENAI_API_KEY), not the key itself"
        )
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"{key}={env_name}: the environment variable {env_name} is not set")
    return value


class HTTPJudge:
    """A judge behind an OpenAI-compatible endpoint.

    Args:
        url: base URL including the version prefix, e.g. ``http://127.0.0.1:8000/v1``.
        endpoint: ``completions`` (``/completions``) or ``chat`` (``/chat/completions``).
        model: the ``model`` field of each request.
        api_key_env: name of the environment variable with the key (sent as a Bearer token).
        max_concurrency: requests in flight at once.
        timeout_s: per-request timeout (connect, read and write).
        max_retries: retries after the first attempt.
        backoff_s: first retry delay (jittered); it doubles with each retry.
        deadline_s: seconds one request may take, retries and waits included (None: no limit).
        max_critique_tokens: generation budget for critique plus verdict.
        top_logprobs: alternatives requested per generated token (0: no log-probs).
        system: system message for the chat endpoint.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint: str = "completions",
        model: str = "judge",
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        max_critique_tokens: int = 64,
        top_logprobs: int = 5,
        system: str = "",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if endpoint not in ENDPOINTS:
            raise ConfigError(
                f"judge.endpoint={endpoint!r}; expected one of {', '.join(ENDPOINTS)}"
            )
        if not url:
            raise ConfigError(
                "judge.url is not set: the server's base URL, e.g. http://host:8000/v1"
            )
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ConfigError(
                "judge: max_concurrency >= 1, max_retries >= 0, timeout_s > 0 and backoff_s >= 0"
            )
        if deadline_s is not None and not deadline_s > 0:
            raise ConfigError(f"judge.deadline_s={deadline_s}: must be > 0 (or null: no limit)")
        self.name = (
            f"http:{url.rstrip('/')}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        )
        self.url = url.rstrip("/")
        self.endpoint = endpoint
        self.model = model
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.timeout_s = float(timeout_s)
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        # A private stream: jitter must not consume (and so shift) the run's seeded RNGs.
        self._jitter = random.Random()
        self.max_critique_tokens = int(max_critique_tokens)
        self.top_logprobs = int(top_logprobs)
        self.system = system
        self.requests = 0
        """Requests sent (retries included), for throughput accounting."""
        headers = {"Content-Type": "application/json"}
        key = read_api_key(api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(float(timeout_s)),
            transport=transport,
            limits=httpx.Limits(max_connections=int(max_concurrency)),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=int(max_concurrency), thread_name_prefix="judge"
        )

    def __repr__(self) -> str:  # never shows headers (the key)
        return f"HTTPJudge({self.name!r}, model={self.model!r})"

    # -- one request with retries

    def _backoff(self, attempt: int) -> float:
        """Jittered exponential delay after failed attempt ``attempt`` (0-based)."""
        return self.backoff_s * 2**attempt * (0.5 + self._jitter.random())

    def _give_up(self, what: str, last: str, batch: _Batch, hung: bool) -> JudgeError:
        message = f"{self.name}: {what}: {last}"
        if hung and batch.hung is None:
            batch.hung = message
        return JudgeError(message)

    def _post(self, payload: dict[str, Any], batch: _Batch) -> dict[str, Any]:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        deadline = time.monotonic() + (self.deadline_s if self.deadline_s else math.inf)
        last, wait, hung = "", 0.0, False
        for attempt in range(self.max_retries + 1):
            if attempt:
                if time.monotonic() + wait >= deadline:
                    # Waiting only to fail at the deadline would hold the step for nothing.
                    what = f"gave up after {attempt} attempts ({self.deadline_s:g}s deadline)"
                    raise self._give_up(what, last, batch, hung)
                time.sleep(wait)
            if batch.hung is not None:
                # Another request of this batch found the server hung: don't wait it out again.
                raise JudgeError(f"not sent, the server did not answer: {batch.hung}")
            self.requests += 1
            timeout = min(self.timeout_s, deadline - time.monotonic())
            wait, hung = self._backoff(attempt), True
            try:
                resp = self._client.post(self.url + path, json=payload, timeout=timeout)
            except httpx.TimeoutException:
                last = f"timed out after {timeout:.3g}s"
                continue
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            hung = False
            if resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                after = retry_after_s(resp.headers.get("Retry-After"))
                if after is not None and resp.status_code in _RETRY_AFTER_STATUS:
                    wait, last = after, f"{last} (Retry-After: {after:.3g}s)"
                continue
            if resp.status_code >= 400:
                raise JudgeError(f"{self.name}: HTTP {resp.status_code}: {resp.text[:300]!r}")
            try:
                body = resp.json()
                _check_body(body, self.endpoint)
                return body
            except (ValueError, JudgeError) as exc:
                last = f"unexpected answer ({exc}): {resp.text[:200]!r}"
                continue
        raise self._give_up(f"failed after {self.max_retries + 1} attempts", last, batch, hung)

    def _request(
        self,
        context: str,
        max_tokens: int,
        logprobs: bool,
        stop: list[str] | None,
        batch: _Batch,
    ) -> tuple[str, list[str], list[dict[str, float]] | None]:
        """(generated text, tokens, per-token top log-probs or None)."""
        k = self.top_logprobs if logprobs else 0
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if stop:
            payload["stop"] = stop
        if self.endpoint == "chat":
            messages = [{"role": "system", "content": self.system}] if self.system else []
            payload["messages"] = [*messages, {"role": "user", "content": context}]
            if k:
                payload["logprobs"], payload["top_logprobs"] = True, k
            return _parse_chat(self._post(payload, batch))
        payload["prompt"] = context
        if k:
            payload["logprobs"] = k
        return _parse_completion(self._post(payload, batch))

    # -- the backend protocol

    def _critique_one(
        self, context: str, verdict_prefix: str, options: Sequence[str], batch: _Batch
    ) -> RawVerdict:
        use_lp = self.top_logprobs > 0
        text, tokens, tops = self._request(context, self.max_critique_tokens, use_lp, None, batch)
        critique = cut_critique(text, verdict_prefix)
        lps = _verdict_logprobs(tokens, tops, verdict_prefix, options) if tops else None
        marker = verdict_prefix.strip()
        if lps is None and use_lp and self.endpoint == "completions" and marker not in text:
            # The judge did not reach its verdict: ask for it after the critique.
            more, _, tops2 = self._request(
                context + critique + verdict_prefix, 3, True, None, batch
            )
            text = critique + verdict_prefix + more
            if tops2:
                lps = match_option_logprobs(tops2[0], options)
        return RawVerdict(critique, lps, text)

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except JudgeError as exc:
            return exc

    def critique(
        self, contexts: Sequence[str], verdict_prefix: str, options: Sequence[str]
    ) -> list[RawVerdict | JudgeError]:
        batch = _Batch()
        return list(
            self._pool.map(
                lambda c: self._guard(self._critique_one, c, verdict_prefix, options, batch),
                contexts,
            )
        )

    def complete(self, contexts: Sequence[str], max_tokens: int) -> list[str | JudgeError]:
        batch = _Batch()

        def one(context: str) -> str:
            text = self._request(context, max_tokens, False, ["\n"], batch)[0]
            return text.split("\n", 1)[0]

        return list(self._pool.map(lambda c: self._guard(one, c), contexts))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()


# ------------------------------------------------------------------------------------------
# parsing answers
# ------------------------------------------------------------------------------------------


def _check_body(body: Any, endpoint: str) -> None:
    """Raise JudgeError unless ``body`` has ``choices[0]`` with text (or a message)."""
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("choices"), list)
        or not body["choices"]
    ):
        raise JudgeError("no 'choices' list in the answer")
    choice = body["choices"][0]
    if not isinstance(choice, dict):
        raise JudgeError("choices[0] is not an object")
    if endpoint == "chat":
        message = choice.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise JudgeError("choices[0].message.content is not a string")
    elif not isinstance(choice.get("text"), str):
        raise JudgeError("choices[0].text is not a string")


def _parse_completion(body: dict[str, Any]) -> tuple[str, list[str], list[dict[str, float]] | None]:
    choice = body["choices"][0]
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        return choice["text"], [], None
    tops = lp.get("top_logprobs")
    if not isinstance(tops, list) or len(tops) != len(lp["tokens"]):
        return choice["text"], [str(t) for t in lp["tokens"]], None
    return choice["text"], [str(t) for t in lp["tokens"]], [dict(t or {}) for t in tops]


def _parse_chat(body: dict[str, Any]) -> tuple[str, list[str], list[dict[str, float]] | None]:
    choice = body["choices"][0]
    text = choice["message"]["content"]
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        return text, [], None
    tokens, tops = [], []
    for entry in content:
        if not isinstance(entry, dict):
            return text, [], None
        tokens.append(str(entry.get("token", "")))
        alts = entry.get("top_logprobs") or []
        tops.append({str(a["token"]): float(a["logprob"]) for a in alts if isinstance(a, dict)})
    return text, tokens, tops


def _verdict_logprobs(
    tokens: list[str], tops: list[dict[str, float]], verdict_prefix: str, options: Sequence[str]
) -> dict[str, float] | None:
    """Options' log-probs at the first non-blank token after the verdict marker, if any."""
    marker = verdict_prefix.strip()
    text, end = "", -1
    for i, tok in enumerate(tokens):
        text += tok
        if end < 0 and marker and marker in text:
            end = i
            # The marker may end inside this token; what follows in it is the verdict.
            rest = text[text.find(marker) + len(marker) :]
            if rest.strip():
                return match_option_logprobs(tops[i], options)
            continue
        if end >= 0 and tok.strip():
            return match_option_logprobs(tops[i], options)
    return None
