"""Kept for old commands: ``python benchmarks/rl_step.py --algorithm grpo`` now runs
``python -m benchmarks --workloads grpo --no-trl --no-scaling`` (same options otherwise).

The suite's entry point is ``python -m benchmarks`` (benchmarks/run.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import main


def translate(argv: list[str]) -> list[str]:
    """``--algorithm X`` -> ``--workloads X``; TRL and scaling off unless asked for."""
    out, it = [], iter(argv)
    for arg in it:
        if arg == "--algorithm":
            out.append(f"--workloads={next(it)}")
        elif arg.startswith("--algorithm="):
            out.append("--workloads=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    if not any(a.startswith("--workloads") for a in out):
        out.append("--workloads=ppo")
    return ["--no-trl", "--no-scaling", "--rounds=1", *out]


if __name__ == "__main__":
    raise SystemExit(main(translate(sys.argv[1:])))
