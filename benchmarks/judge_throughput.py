"""Judge scoring throughput (responses/s) of the local and HTTP backends on CPU.

    .venv/bin/python benchmarks/judge_throughput.py --judge runs/j/judge [--responses 128]
        [--threads 1] [--json outputs/benchmarks/judge_throughput.json]

Scores held-out (prompt, response) pairs of the built-in task with the critique judge:

* ``local``: the judge in-process (batched greedy critique, teacher-forced verdict), per
  batch size;
* ``http``: the same judge served by ``python -m alignkit.tools.judge_server`` in a separate
  process (its own thread budget), scored through ``/v1/completions`` with log-probs, per
  client concurrency (the server gathers concurrent requests into batches).

Both in ``per_principle`` mode (one critique per principle: 3 judge calls per response) and
``combined`` mode (one call). Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alignkit.judges import CritiqueJudge, load_template
from alignkit.judges.http import HTTPJudge
from alignkit.judges.local import LocalJudge
from alignkit.tasks import AssistTask
from alignkit.tasks.judge_data import heldout_pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the judge server exited during start-up")
        try:
            if httpx.get(url + "/models", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the judge server at {url} did not start in {timeout}s")


def _time(judge: CritiqueJudge, prompts: list[str], responses: list[str]) -> tuple[float, float]:
    """(responses/s, fraction of verdicts from log-probs) for one pass after a warm-up."""
    judge.score(prompts[:4], responses[:4])
    t = time.perf_counter()
    judged = judge.score(prompts, responses)
    seconds = time.perf_counter() - t
    return len(prompts) / seconds, sum(j.source == "logprobs" for j in judged) / len(judged)


def _measure(
    backend: Any, template: Any, prompts: list[str], responses: list[str], kind: str, setting: str
) -> list[dict[str, Any]]:
    """Responses/s and the log-prob fraction, per-principle and all-principles verdicts."""
    rows = []
    for per in (True, False):
        judge = CritiqueJudge(backend, template, per_principle=per)
        rps, lp = _time(judge, prompts, responses)
        rows.append(
            {"backend": kind, "setting": setting, "per_principle": per,
             "responses_per_s": rps, "logprob_fraction": lp}
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge", required=True, help="the judge folder (alignkit stage=judge)")
    parser.add_argument("--responses", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--json", default="outputs/benchmarks/judge_throughput.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    task = AssistTask(max_operand=5)
    pairs = heldout_pairs(task, task.eval_prompts())[: args.responses]
    prompts = [task.format_prompt(r) for r, _ in pairs]
    responses = [s for _, s in pairs]
    template = load_template("assist")
    rows: list[dict[str, Any]] = []

    for bs in (int(x) for x in args.batch_sizes.split(",")):
        backend = LocalJudge(args.judge, batch_size=bs)
        rows += _measure(backend, template, prompts, responses, "local", f"batch {bs}")

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "alignkit.tools.judge_server", "--model", args.judge]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait(url, proc)
        for conc in (int(x) for x in args.concurrency.split(",")):
            backend = HTTPJudge(url, max_concurrency=conc, timeout_s=120)
            setting = f"concurrency {conc}"
            rows += _measure(backend, template, prompts, responses, "http", setting)
            backend.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"judge throughput, {len(prompts)} responses, {args.threads} thread(s) per process")
    print(f"{'backend':8} {'setting':16} {'mode':14} {'responses/s':>12} {'logprobs':>9}")
    for r in rows:
        mode = "per_principle" if r["per_principle"] else "combined"
        print(
            f"{r['backend']:8} {r['setting']:16} {mode:14} {r['responses_per_s']:12.1f} "
            f"{r['logprob_fraction']:9.2f}"
        )
    meta = {"judge": args.judge, "responses": len(prompts), "threads": args.threads}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
