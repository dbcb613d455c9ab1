"""Kept for old commands: ``python benchmarks/reward_model.py`` now runs
``python -m benchmarks --workloads reward_model --no-trl --no-scaling`` (same options).

The suite's entry point is ``python -m benchmarks`` (benchmarks/run.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import main

if __name__ == "__main__":
    args = ["--workloads=reward_model", "--no-trl", "--no-scaling", "--rounds=1"]
    raise SystemExit(main([*args, *sys.argv[1:]]))
