"""The one-way loop and what keeps a run whole.

* :mod:`alignkit.engine.loop` - the RL loop: rollout -> reward -> advantage -> update, the
  prompt sampler, the phase checks and the step's metrics;
* :mod:`alignkit.engine.gather` - the ranks' rollouts gathered into the global batch;
* :mod:`alignkit.engine.checkpoint` - atomic checkpoints, resume and the run's fingerprint;
* :mod:`alignkit.engine.guards` - non-finite values never reach the weights or a checkpoint;
* :mod:`alignkit.engine.run_lock` - one run per run directory.

``alignkit.engine`` keeps the names it had when it was one module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignkit.engine.gather import gather_rollout, merge_rollouts
    from alignkit.engine.loop import (
        DEFAULT_MAX_CONSECUTIVE_SKIPS,
        Engine,
        PromptSampler,
        batch_metrics,
        check_advantage_phase,
    )

__all__ = [
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
    "Engine",
    "PromptSampler",
    "batch_metrics",
    "check_advantage_phase",
    "gather_rollout",
    "merge_rollouts",
]
_WHERE = {name: "alignkit.engine.loop" for name in __all__} | {
    "gather_rollout": "alignkit.engine.gather",
    "merge_rollouts": "alignkit.engine.gather",
}


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): the update machinery imports alignkit.engine.guards,
    # and the loop imports the update machinery, so this package imports neither eagerly.
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
