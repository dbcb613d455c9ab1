"""The FSDP part of the architecture matrix (tests/test_arch_matrix.py), run under torchrun.

    torchrun --standalone --nproc_per_node=2 tests/arch_matrix_fsdp.py RUNS.json

``RUNS.json`` is a list of ``{"run_dir": ..., "overrides": [...]}``: each is one alignkit run
(``backend=fsdp`` among its overrides), composed as the ``alignkit`` command composes it and
run in this process through :func:`alignkit.cli.run_stage`. One launch serves every
architecture: torchrun's start-up and the imports are paid once, and the gloo process group is
created here once (the backend then uses it instead of creating its own per run).

A run that raises writes its traceback to ``<run_dir>/error_rank<r>.txt`` and the loop goes
on with the next run, so one broken architecture fails only its own test case. A run that
fails on one rank alone leaves the other waiting in a collective until the group's timeout.
"""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

TIMEOUT_S = 120
"""Collective timeout: a run that fails on one rank only stops the launch after this long."""


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from hydra import compose, initialize_config_module

    from alignkit.cli import registration, run_stage

    runs = json.loads(Path(argv[0]).read_text())
    manager, registry = registration()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    try:
        for run in runs:
            run_dir = Path(run["run_dir"])
            overrides = [*run["overrides"], f"run_dir={run_dir}"]
            try:
                with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
                    cfg = compose(config_name="config", overrides=overrides)
                run_stage(cfg, run_dir, manager, registry)
            except Exception:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / f"error_rank{rank}.txt").write_text(traceback.format_exc())
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
