"""Plugin manager: discovery through entry points, activation by name, validation, tracing.

Two phases, so that only what the config asks for takes part in a run:

1. :func:`discover` imports every installed plugin (the ``alignkit`` entry-point group, plus
   any named in ``ALIGNKIT_PLUGINS`` or registered in-process with
   :func:`register_local_plugin`). Import errors are kept with the plugin and shown, never
   swallowed. Registration hooks run on all of them, before the config is composed.
2. :meth:`PluginManager.activate` registers only the plugins the composed config names, checks
   every implementation against the specs (``check_pending``), and the engine calls hooks
   through :meth:`PluginManager.call`, which names the plugin when a hook raises.

Set ``ALIGNKIT_TRACE_HOOKS=1`` to print every hook call, its plugins and its result.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import TracebackType
from typing import Any

import pluggy

from alignkit import hookspecs
from alignkit.errors import HookError, PluginError

ENTRY_POINT_GROUP = "alignkit"
ENV_PLUGINS = "ALIGNKIT_PLUGINS"
ENV_TRACE = "ALIGNKIT_TRACE_HOOKS"
CORE_PLUGIN = "core"

_local_plugins: dict[str, Any] = {}


@dataclass
class PluginInfo:
    """One installed plugin: where it comes from and what it implements."""

    name: str
    source: str
    """Where it was found: ``"<dist> <version>"``, ``"env ALIGNKIT_PLUGINS"`` or ``"local"``."""
    target: str
    """The import path (``module`` or ``module:attribute``)."""
    obj: Any = None
    """The imported module or object; None when the import failed."""
    error: str | None = None
    """The import traceback, when the import failed."""
    hooks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def register_local_plugin(name: str, plugin: Any) -> None:
    """Make ``plugin`` (a module, object or class) installable by ``name`` in this process."""
    _local_plugins[name] = plugin


def unregister_local_plugin(name: str) -> None:
    """Forget a plugin registered with :func:`register_local_plugin`."""
    _local_plugins.pop(name, None)


def _load_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _hook_names(obj: Any) -> list[str]:
    """Names of the ``@hookimpl``-marked functions of ``obj`` (what pluggy will call)."""
    marker = f"{hookspecs.PROJECT}_impl"
    return sorted(name for name in dir(obj) if hasattr(getattr(obj, name, None), marker))


def _entry_point_candidates() -> Iterable[tuple[str, str, str]]:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
        yield ep.name, ep.value, source


def _env_candidates() -> Iterable[tuple[str, str, str]]:
    spec = os.environ.get(ENV_PLUGINS, "").strip()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, target = item.partition("=")
        if not sep:
            raise PluginError(f"{ENV_PLUGINS} entry {item!r} must look like name=module[:attr]")
        yield name.strip(), target.strip(), f"env {ENV_PLUGINS}"


def discover() -> dict[str, PluginInfo]:
    """Import every installed plugin; failures are recorded on the :class:`PluginInfo`."""
    found: dict[str, PluginInfo] = {}
    for name, target, source in [*_entry_point_candidates(), *_env_candidates()]:
        if name in found:
            # Two distributions claim one name: keep the first, say so instead of guessing.
            found[name].error = (
                f"plugin name {name!r} is claimed twice: {found[name].source} "
                f"({found[name].target}) and {source} ({target})"
            )
            continue
        info = PluginInfo(name=name, source=source, target=target)
        try:
            info.obj = _load_target(target)
        except Exception:
            info.error = traceback.format_exc()
        found[name] = info
    for name, obj in _local_plugins.items():
        found[name] = PluginInfo(name=name, source="local", target=repr(obj), obj=obj)
    for info in found.values():
        if info.obj is not None:
            info.hooks = _hook_names(info.obj)
    return found


def _instantiate(obj: Any) -> Any:
    """A plugin given as a class gets a fresh instance per manager (per-run state)."""
    return obj() if inspect.isclass(obj) else obj


def _new_pluggy_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def import_failure_message(info: PluginInfo) -> str:
    what = info.error or ""
    if not what.startswith("violates"):
        what = f"failed to import:\n{what}"
    return f"plugin {info.name!r} ({info.source}, {info.target}) {what}"


class PluginManager:
    """Typed facade over pluggy for the alignkit hook contract."""

    def __init__(self, installed: dict[str, PluginInfo] | None = None) -> None:
        self.installed = discover() if installed is None else installed
        self.pm = _new_pluggy_manager()
        self.active: list[str] = []
        if os.environ.get(ENV_TRACE, "") not in ("", "0"):
            self._enable_tracing()

    # -- registration phase -------------------------------------------------------------------

    def run_registration(self, config_store: Any, registry: Any) -> None:
        """Call the registration hooks of every installed plugin that imported."""
        reg = _new_pluggy_manager()
        for info in self.installed.values():
            if info.ok:
                self._validate_alone(info)
            if info.ok:
                self._register(reg, info)
            else:
                print(f"alignkit: warning: {import_failure_message(info)}", file=sys.stderr)
        for impl in reg.hook.register_configs.get_hookimpls():
            _call_named(impl, "register_configs", config_store=config_store)
        for impl in reg.hook.register_components.get_hookimpls():
            # Each plugin's registrations carry its name, so a clash names both owners.
            owned = _OwnedRegistry(registry, impl.plugin_name)
            _call_named(impl, "register_components", registry=owned)

    def _validate_alone(self, info: PluginInfo) -> None:
        """Check one plugin against the specs; a broken one is marked, not fatal, until used.

        A misspelt hook in an installed but inactive plugin must not stop every run, so the
        error is kept on the plugin (shown as a warning and by ``alignkit plugins``) and
        raised only if the config activates it.
        """
        probe = _new_pluggy_manager()
        try:
            probe.register(_instantiate(info.obj), name=info.name)
            probe.check_pending()
        except pluggy.PluginValidationError as exc:
            info.error = f"violates the hook contract: {exc}"

    # -- activation ---------------------------------------------------------------------------

    def activate(self, names: Iterable[str], *, reason: dict[str, str] | None = None) -> None:
        """Register the named plugins (the core always) and validate them against the specs."""
        reason = reason or {}
        wanted = [CORE_PLUGIN, *[n for n in names if n != CORE_PLUGIN]]
        for name in dict.fromkeys(wanted):
            info = self.installed.get(name)
            if info is None:
                installed = ", ".join(sorted(self.installed)) or "none"
                why = f" (asked for by {reason[name]})" if name in reason else ""
                raise PluginError(f"unknown plugin {name!r}{why}; installed plugins: {installed}")
            if not info.ok:
                raise PluginError(import_failure_message(info))
            self._register(self.pm, info)
            self.active.append(name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = getattr(exc, "plugin", None)
            name = self.pm.get_name(plugin) if plugin is not None else "?"
            raise PluginError(f"plugin {name!r} violates the hook contract: {exc}") from None
        declared = [
            i.plugin_name
            for i in self.pm.hook.algorithm_needs.get_hookimpls()
            if i.plugin_name != CORE_PLUGIN
        ]
        if len(declared) > 1:
            # firstresult: the last activated would silently overrule the algorithm.
            raise PluginError(
                f"plugins {', '.join(sorted(declared))} all answer 'algorithm_needs'; only the "
                "algorithm may declare what the run needs"
            )
        for hook in ("rollout", "advantage", "update"):
            if not getattr(self.pm.hook, hook).get_hookimpls():
                raise PluginError(
                    f"no active plugin implements the {hook!r} hook; active plugins: "
                    f"{', '.join(self.active)}"
                )

    def _register(self, pm: pluggy.PluginManager, info: PluginInfo) -> None:
        try:
            pm.register(_instantiate(info.obj), name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {info.name!r} violates the hook contract: {exc}") from None

    # -- calling ------------------------------------------------------------------------------

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call ``hook``; an exception from an implementation becomes a :class:`HookError`."""
        caller = getattr(self.pm.hook, hook)
        try:
            return caller(**kwargs)
        except HookError:
            raise
        except Exception as exc:
            plugin = _plugin_in_traceback(caller, exc.__traceback__)
            raise HookError(plugin, hook, exc) from exc

    def implementers(self, hook: str) -> list[str]:
        """Active plugins implementing ``hook``, in call order."""
        return [i.plugin_name for i in reversed(getattr(self.pm.hook, hook).get_hookimpls())]

    def _enable_tracing(self) -> None:
        def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            names = ", ".join(i.plugin_name for i in reversed(impls))  # call order
            print(f"[alignkit hook] {hook_name} -> {names}", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            exc = outcome.exception
            status = f"raised {type(exc).__name__}" if exc else f"returned {_short(outcome)}"
            print(f"[alignkit hook] {hook_name} {status}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)


def _call_named(impl: Any, hook: str, **kwargs: Any) -> None:
    """Call one registration hook implementation; an exception names plugin and hook."""
    try:
        impl.function(**kwargs)
    except Exception as exc:
        raise HookError(impl.plugin_name, hook, exc) from exc


def _short(outcome: Any) -> str:
    text = repr(outcome.get_result())
    return text if len(text) < 120 else text[:117] + "..."


def _plugin_in_traceback(caller: Any, tb: TracebackType | None) -> str:
    """The plugin whose implementation appears first (outermost) in the traceback."""
    owners = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
    while tb is not None:
        if tb.tb_frame.f_code in owners:
            return owners[tb.tb_frame.f_code]
        tb = tb.tb_next
    return "?"


class _OwnedRegistry:
    """Wraps a registry so that ``add`` records which plugin registered a component."""

    def __init__(self, registry: Any, owner: str) -> None:
        self._registry, self._owner = registry, owner

    def add(self, kind: str, name: str, factory: Any) -> None:
        self._registry.add(kind, name, factory, owner=self._owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)


def describe(installed: dict[str, PluginInfo]) -> list[dict[str, str]]:
    """Rows for ``alignkit plugins``: name, source, target, hooks (or the import error)."""
    rows = []
    for name in sorted(installed):
        info = installed[name]
        status = ", ".join(info.hooks) if info.ok else "IMPORT ERROR: " + _last_line(info.error)
        rows.append({"name": name, "source": info.source, "target": info.target, "hooks": status})
    return rows


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
