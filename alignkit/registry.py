"""Named components contributed by plugins through the ``register_components`` hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alignkit.errors import PluginError


class ComponentRegistry:
    """A two-level map ``kind -> name -> factory`` (e.g. ``task -> assist -> AssistTask``)."""

    def __init__(self) -> None:
        self._factories: dict[str, dict[str, Callable[..., Any]]] = {}
        self._owners: dict[tuple[str, str], str] = {}

    def add(self, kind: str, name: str, factory: Callable[..., Any], *, owner: str = "?") -> None:
        """Register ``factory`` under ``kind/name``; a second registration is an error."""
        key = (kind, name)
        if key in self._owners:
            raise PluginError(
                f"{kind} {name!r} is registered twice (by {self._owners[key]!r} and {owner!r})"
            )
        self._factories.setdefault(kind, {})[name] = factory
        self._owners[key] = owner

    def kinds(self) -> list[str]:
        """Sorted kinds that have at least one registration."""
        return sorted(self._factories)

    def owner(self, kind: str, name: str) -> str:
        """The plugin that registered ``kind/name``."""
        return self._owners.get((kind, name), "?")

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self._factories.get(kind, {}))

    def get(self, kind: str, name: str) -> Callable[..., Any]:
        """The factory for ``kind/name``; the error lists what is registered."""
        try:
            return self._factories[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} {name!r}; registered: {known}") from None

    def build(self, kind: str, name: str, **kwargs: Any) -> Any:
        """Call the factory for ``kind/name`` with ``kwargs``."""
        return self.get(kind, name)(**kwargs)
