"""Hardware backends selected with ``backend=<name>``: cpu, single_gpu, fsdp.

See :class:`alignkit.backends.base.Backend` for what a backend owns. A plugin may add one by
registering a ``backend`` component (``registry.add("backend", name, factory)``); the factory
receives the ``backend`` config node.
"""

from __future__ import annotations

from typing import Any

from alignkit.backends.base import Backend, shard_bounds
from alignkit.backends.cpu import CPUBackend
from alignkit.backends.fsdp import FSDPBackend
from alignkit.backends.single_gpu import SingleGPUBackend
from alignkit.errors import ConfigError

BACKENDS: dict[str, type[Backend]] = {
    "cpu": CPUBackend,
    "single_gpu": SingleGPUBackend,
    "fsdp": FSDPBackend,
}

__all__ = [
    "BACKENDS",
    "Backend",
    "CPUBackend",
    "FSDPBackend",
    "SingleGPUBackend",
    "build_backend",
    "shard_bounds",
]


def build_backend(cfg: Any, registry: Any = None) -> Backend:
    """The backend named by ``cfg.name`` (built in, or a registered ``backend`` component)."""
    name = str(cfg.name)
    if name in BACKENDS:
        return BACKENDS[name](cfg)
    if registry is not None and name in registry.names("backend"):
        backend = registry.build("backend", name, cfg=cfg)
        if not isinstance(backend, Backend):
            raise ConfigError(f"backend {name!r} did not build an alignkit Backend")
        return backend
    known = sorted({*BACKENDS, *(registry.names("backend") if registry is not None else [])})
    raise ConfigError(f"backend.name={name!r} is not a known backend; known: {', '.join(known)}")
