"""A minimal OpenAI-compatible server for a local causal LM (e.g. the tiny judge).

    python -m alignkit.tools.judge_server --model runs/j/judge --port 8000 [--api-key-env NAME]

Built on the standard library's ``http.server`` so it runs anywhere alignkit runs (no extra
packages, no network). It serves:

* ``GET /v1/models``;
* ``POST /v1/completions``: ``prompt`` (a string), ``max_tokens``, ``temperature`` (0:
  greedy), ``stop``, ``logprobs`` (k: the top-k alternatives of every generated token, in the
  legacy ``{tokens, token_logprobs, top_logprobs}`` form);
* ``POST /v1/chat/completions``: ``messages`` (the tokenizer's chat template when it has one,
  else the non-system contents joined by newlines), ``logprobs: true`` and ``top_logprobs``.

Requests are handled on threads and gathered by one worker into batches (up to
``max_batch`` requests arriving within ``batch_wait_s``), so concurrent clients share the
model's forwards. Log-probs come from one teacher-forced forward over prompt and completion.
With ``--api-key-env NAME`` every request must carry ``Authorization: Bearer $NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from alignkit.models import load_causal_lm, position_ids_from_mask
from alignkit.models.generation import generate, tokenize_prompts

__all__ = ["JudgeServer", "main"]


@dataclass
class _Job:
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    stop: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: str | None = None


class _Model:
    """The model, its tokenizer and the batched generation the worker runs."""

    def __init__(self, path: str, device: str, trust_remote_code: bool) -> None:
        self.model, self.tokenizer = load_causal_lm(
            path, device=device, trust_remote_code=trust_remote_code
        )
        self.device = torch.device(device)
        config = self.model.config
        self.limit = int(
            getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 2048)
        )
        self.generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def run(self, jobs: list[_Job]) -> None:
        """Generate for jobs that share max_tokens and temperature, in one batch."""
        tok = self.tokenizer
        first = jobs[0]
        max_new = max(1, min(first.max_tokens, self.limit - 2))
        ids, mask = tokenize_prompts(tok, [j.prompt for j in jobs], max_length=self.limit - max_new)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = generate(
            self.model,
            ids,
            mask,
            max_new_tokens=max_new,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            temperature=first.temperature if first.temperature > 0 else 1.0,
            greedy=first.temperature <= 0,
            generator=self.generator,
            return_logprobs=False,
        )
        k = max(j.top_k for j in jobs)
        tops = self._top_logprobs(ids, mask, out.response_ids, out.response_mask, k) if k else None
        for row, job in enumerate(jobs):
            n = int(out.response_mask[row].sum())
            token_ids = out.response_ids[row, :n].tolist()
            ended = bool(out.finished[row])
            if ended and token_ids and token_ids[-1] == tok.eos_token_id:
                token_ids = token_ids[:-1]  # the EOS is not part of the text
            job.result = self._choice(job, token_ids, tops[row] if tops else None, ended)

    def _top_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, rids: torch.Tensor, rmask: torch.Tensor, k: int
    ) -> list[list[tuple[list[int], list[float], float]]]:
        """Per row and generated position: (top-k ids, their log-probs, the chosen token's)."""
        seq = torch.cat([ids, rids], dim=1)
        seq_mask = torch.cat([mask, rmask.long()], dim=1)
        logits = self.model(
            input_ids=seq, attention_mask=seq_mask, position_ids=position_ids_from_mask(seq_mask)
        ).logits[:, ids.shape[1] - 1 : -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        top_v, top_i = logp.topk(min(k, logp.shape[-1]), dim=-1)
        chosen = logp.gather(-1, rids[..., None]).squeeze(-1)
        out = []
        for r in range(seq.shape[0]):
            out.append(
                [
                    (top_i[r, t].tolist(), top_v[r, t].tolist(), float(chosen[r, t]))
                    for t in range(rids.shape[1])
                ]
            )
        return out

    def _choice(self, job: _Job, token_ids: list[int], tops: Any, ended: bool) -> dict[str, Any]:
        tok = self.tokenizer
        pieces = [tok.decode([t], clean_up_tokenization_spaces=False) for t in token_ids]
        text, kept = "", 0
        finish = "stop" if ended else "length"
        for piece in pieces:
            candidate = text + piece
            cuts = [candidate.find(s) for s in job.stop if s and s in candidate]
            if cuts:
                # Keep the token only if part of it comes before the stop string.
                kept += int(min(cuts) > len(text))
                text, finish = candidate[: min(cuts)], "stop"
                break
            text, kept = candidate, kept + 1
        result: dict[str, Any] = {"text": text, "finish_reason": finish, "tokens": pieces[:kept]}
        if tops is not None:
            top_dicts, token_lps = [], []
            for ids_k, vals_k, chosen in tops[:kept]:
                top_dicts.append(
                    {
                        tok.decode([i], clean_up_tokenization_spaces=False): v
                        for i, v in zip(ids_k, vals_k, strict=True)
                    }
                )
                token_lps.append(chosen)
            result["top"] = top_dicts
            result["token_logprobs"] = token_lps
        return result


class JudgeServer:
    """The server object: ``start()`` serves on a background thread, ``stop()`` ends it."""

    def __init__(
        self,
        model_path: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "judge",
        api_key_env: str | None = None,
        device: str = "cpu",
        max_batch: int = 32,
        batch_wait_s: float = 0.005,
        trust_remote_code: bool = False,
    ) -> None:
        self.engine = _Model(model_path, device, trust_remote_code)
        self.model_name = model_name
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.api_key:
            raise SystemExit(f"--api-key-env {api_key_env}: the variable is not set")
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []
        self._running = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> JudgeServer:
        self._running.set()
        for target in (self._worker, self.httpd.serve_forever):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._running.clear()
        self.httpd.shutdown()
        self.httpd.server_close()

    def submit(self, job: _Job, timeout: float = 600.0) -> dict[str, Any]:
        self.jobs.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("generation timed out")
        if job.error:
            raise RuntimeError(job.error)
        assert job.result is not None
        return job.result

    def _worker(self) -> None:
        """Gather jobs that arrive together and run them as batches of equal settings."""
        while self._running.is_set():
            try:
                batch = [self.jobs.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple[int, float], list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.max_tokens, job.temperature), []).append(job)
            for jobs in groups.values():
                try:
                    self.engine.run(jobs)
                except Exception as exc:  # reported to each client as a 500
                    for job in jobs:
                        job.error = f"{type(exc).__name__}: {exc}"
                for job in jobs:
                    job.done.set()


def _chat_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "system")


def _handler(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: no per-request lines
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def _authorised(self) -> bool:
            if server.api_key is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {server.api_key}"

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                return self._error(404, f"unknown path {self.path}")
            self._send(
                200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]}
            )

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorised():
                return self._error(401, "invalid or missing API key")
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as exc:
                return self._error(400, f"invalid JSON: {exc}")
            path = self.path.rstrip("/")
            try:
                if path == "/v1/completions":
                    return self._send(200, self._completions(body))
                if path == "/v1/chat/completions":
                    return self._send(200, self._chat(body))
            except (KeyError, TypeError, ValueError) as exc:
                return self._error(400, f"bad request: {exc}")
            except (RuntimeError, TimeoutError) as exc:
                return self._error(500, str(exc))
            return self._error(404, f"unknown path {self.path}")

        def _job(self, body: dict[str, Any], prompt: str, top_k: int) -> dict[str, Any]:
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else [str(s) for s in stop]
            job = _Job(
                prompt=prompt,
                max_tokens=int(body.get("max_tokens") or 16),
                temperature=float(body.get("temperature", 1.0) or 0.0),
                top_k=top_k,
                stop=stop,
            )
            return server.submit(job)

        def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string")
            k = int(body.get("logprobs") or 0)
            res = self._job(body, prompt, k)
            choice: dict[str, Any] = {
                "index": 0,
                "text": res["text"],
                "finish_reason": res["finish_reason"],
            }
            choice["logprobs"] = (
                {
                    "tokens": res["tokens"],
                    "token_logprobs": res["token_logprobs"],
                    "top_logprobs": res["top"],
                }
                if k
                else None
            )
            return {
                "id": f"cmpl-{time.time_ns()}",
                "object": "text_completion",
                "model": server.model_name,
                "choices": [choice],
            }

        def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            k = int(body.get("top_logprobs") or (1 if body.get("logprobs") else 0))
            res = self._job(body, _chat_prompt(server.engine.tokenizer, messages), k)
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": res["text"]},
                "finish_reason": res["finish_reason"],
                "logprobs": None,
            }
            if body.get("logprobs"):
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": t,
                            "logprob": lp,
                            "top_logprobs": [{"token": a, "logprob": v} for a, v in top.items()],
                        }
                        for t, lp, top in zip(
                            res["tokens"], res["token_logprobs"], res["top"], strict=True
                        )
                    ]
                }
            return {
                "id": f"chatcmpl-{time.time_ns()}",
                "object": "chat.completion",
                "model": server.model_name,
                "choices": [choice],
            }

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder of the causal LM to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default="judge")
    parser.add_argument("--api-key-env", default=None, help="require this env var's value as key")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args(argv)
    server = JudgeServer(
        args.model,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        api_key_env=args.api_key_env,
        device=args.device,
        max_batch=args.max_batch,
    ).start()
    print(f"serving {args.model} at {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
