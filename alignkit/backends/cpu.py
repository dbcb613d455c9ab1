"""``backend=cpu``: one process on the CPU in fp32 (the default)."""

from __future__ import annotations

from alignkit.backends.base import Backend


class CPUBackend(Backend):
    """The degenerate backend: every collective is the identity, models stay plain modules."""

    name = "cpu"
