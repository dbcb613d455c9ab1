"""A rule-based pairwise judge for the own-data example, served over the OpenAI API.

It stands in for the judge you would run yourself (a hosted model, vLLM, ``transformers
serve``): it answers ``/v1/completions`` requests rendered from alignkit's pairwise judge
template, reads the request and the two responses out of the prompt, scores each against
the example's answer key (the right answer alone 1, the right answer with other words 0.5,
anything else 0) and replies ``Verdict: A`` or ``Verdict: B`` (``A`` on a tie, a position
preference that judging both orders cancels)::

    python examples/own_data/rule_judge.py examples/own_data/data/answers.json --port 8011
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_QUESTION = re.compile(r"User: (.*?)\n", re.S)
_RESPONSES = re.compile(r"Response A: (.*?)\nResponse B: (.*?)\n\n", re.S)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def score(answer: str, response: str) -> float:
    """1 for the answer alone, 0.5 for the answer among other words, else 0."""
    want, got = _words(answer), _words(response)
    if got == want:
        return 1.0
    n = len(want)
    inside = any(got[i : i + n] == want for i in range(len(got) - n + 1))
    return 0.5 if want and inside else 0.0


def verdict(answers: dict[str, str], prompt: str) -> str:
    """``" <critique>\\nVerdict: A"`` (or B) for a rendered pairwise judge prompt."""
    question = _QUESTION.search(prompt)
    responses = _RESPONSES.search(prompt)
    if question is None or responses is None:
        return " I cannot read the request.\nVerdict: A"
    answer = answers.get(question.group(1).strip(), "")
    a, b = (score(answer, r.strip()) for r in responses.groups())
    letter = "B" if b > a else "A"
    return f" Response {letter} is closer to the expected answer.\nVerdict: {letter}"


class RuleJudge:
    """The server; ``url`` is the base URL with the ``/v1`` prefix."""

    def __init__(self, answers: dict[str, str], port: int = 0) -> None:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = verdict(judge.answers, str(body.get("prompt", "")))
                data = json.dumps({"choices": [{"text": text, "finish_reason": "stop"}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())

        self.answers = answers
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> RuleJudge:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("answers", type=Path)
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    judge = RuleJudge(json.loads(args.answers.read_text()), args.port)
    print(f"rule judge on {judge.url}", flush=True)
    judge.server.serve_forever()


if __name__ == "__main__":
    main()
