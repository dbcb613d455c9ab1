"""Errors that alignkit reports to the user as one clear line (and a non-zero exit)."""

from __future__ import annotations


class AlignkitError(Exception):
    """Base class: the message names the problem (file and line, config key, or plugin)."""


class ConfigError(AlignkitError):
    """A config value is missing, misspelt or out of range; the message names the key."""


class DataError(AlignkitError):
    """A data file is missing or malformed; the message names the file and line."""


class PluginError(AlignkitError):
    """A plugin is unknown, fails to import, or violates the hook contract."""


class HookError(AlignkitError):
    """A plugin's hook implementation raised; the message names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, cause: BaseException) -> None:
        self.plugin, self.hook, self.cause = plugin, hook, cause
        super().__init__(
            f"plugin {plugin!r} failed in hook {hook!r}: {type(cause).__name__}: {cause}"
        )
