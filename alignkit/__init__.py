"""alignkit: a plugin-based toolkit for aligning language models with human feedback."""

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.hookspecs import hookimpl

__all__ = ["Rollout", "RunContext", "hookimpl"]
__version__ = "0.1.0"
