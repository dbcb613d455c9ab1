"""Update seconds per RL step with 1 and 2 data-parallel ranks, at a fixed global batch.

Usage::

    python benchmarks/data_parallel.py                       # GPT-2 and Llama, GRPO and PPO
    python benchmarks/data_parallel.py --arch llama --algorithms grpo --steps 4

Each workload runs ``stage=rl`` three times on the same config and global batch (16 prompts
x 4 samples, 32 new tokens, ``minibatch_size=16``): ``backend=cpu`` in one process, and
``backend=fsdp`` under ``torchrun --standalone`` with 1 and with 2 ranks (gloo, one thread
per process). The policy is the benchmark suite's tiny GPT-2 or Llama (``python -m
benchmarks --arch``: 4 layers, width 256). Per run it reports the median over the steps
after the first of ``time/update`` and of the other phases (``time/rollout``,
``time/reward``, ``time/advantage``, ``time/step``), read back from the run's
``metrics.jsonl``, and the speed-up of 2 ranks over 1 rank.

With 2 ranks each rank trains on half of every minibatch (``update/rows``), so the update's
forwards and backwards halve; the gradient reduction and the sharded optimizer step are the
overhead. On a 2-core machine 2 ranks use both cores: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHASES = ("time/rollout", "time/reward", "time/advantage", "time/update", "time/step")
ALGORITHMS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo", "algorithm.minibatch_size=16"],
    "ppo": ["algorithm=ppo", "algorithm.value_model=shared", "algorithm.minibatch_size=16"],
}


def _overrides(model_dir: Path, algorithm: str, steps: int, run_dir: Path) -> list[str]:
    return [
        "stage=rl",
        *ALGORITHMS[algorithm],
        "reward=[gold]",
        "logger=none",
        "model=hf",
        f"model.path={model_dir}",
        f"rl.steps={steps}",
        "rl.prompts_per_step=16",
        "rl.samples_per_prompt=4",
        "rl.max_new_tokens=32",
        "rl.checkpoint_every=0",
        "rl.samples_every=0",
        f"run_dir={run_dir}",
    ]


def _model(folder: Path, arch: str) -> Path:
    """The benchmark suite's tiny ``arch`` model (``python -m benchmarks --arch``)."""
    from benchmarks.common import add_common_args
    from benchmarks.run import build_model

    defaults = add_common_args(argparse.ArgumentParser()).parse_args([])
    return build_model(defaults, folder, arch)


def _launch(ranks: int | None, overrides: list[str]) -> None:
    """``ranks=None``: one plain process (backend=cpu); else torchrun with backend=fsdp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if ranks is None:
        cmd = [sys.executable, "-m", "alignkit.cli", *overrides, "backend=cpu"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={ranks}", "-m", "alignkit.cli", *overrides, "backend=fsdp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def _medians(run_dir: Path) -> dict[str, float]:
    """Median of each phase over the steps after the first (start-up costs excluded)."""
    from alignkit.tracking import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "rl"][1:]
    out = {k: statistics.median(float(r[k]) for r in rows) for k in PHASES if k in rows[0]}
    out["update/rows"] = float(rows[0]["update/rows"])
    return out


def run(archs: list[str], algorithms: list[str], steps: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            model_dir = _model(Path(tmp) / arch, arch)
            for algorithm in algorithms:
                row: dict[str, Any] = {"arch": arch, "algorithm": algorithm}
                for label, ranks in (("one_process", None), ("fsdp_1", 1), ("fsdp_2", 2)):
                    run_dir = Path(tmp) / f"{arch}-{algorithm}-{label}"
                    _launch(ranks, _overrides(model_dir, algorithm, steps, run_dir))
                    row[label] = _medians(run_dir)
                row["update_speedup_2_over_1"] = (
                    row["fsdp_1"]["time/update"] / row["fsdp_2"]["time/update"]
                )
                row["step_speedup_2_over_1"] = (
                    row["fsdp_1"]["time/step"] / row["fsdp_2"]["time/step"]
                )
                print(_line(row), flush=True)
                results.append(row)
    return results


def _line(row: dict[str, Any]) -> str:
    cells = [row["arch"], row["algorithm"]]
    for label in ("one_process", "fsdp_1", "fsdp_2"):
        r = row[label]
        cells.append(f"{r['time/update']:.3f} ({r['update/rows']:.0f} rows)")
    cells += [f"{row['update_speedup_2_over_1']:.2f}x", f"{row['step_speedup_2_over_1']:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt2,llama", help="comma-separated: gpt2, llama")
    parser.add_argument("--algorithms", default="grpo,ppo", help="comma-separated: grpo, ppo")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("data_parallel.json"))
    args = parser.parse_args()
    print(
        "| arch | algorithm | update s/step, one process | fsdp 1 rank | fsdp 2 ranks "
        "| update 2 vs 1 rank | step 2 vs 1 rank |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = run(args.arch.split(","), args.algorithms.split(","), args.steps)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
