"""alignkit: a plugin-based toolkit for aligning language models with human feedback.

The names here, with :mod:`alignkit.rl`, are the plugin API (``docs/plugin-api.md``): the
hook marker, the batch, the run context and its calls, and the declarations an algorithm
makes. They keep their import paths across releases.
"""

from alignkit.batch import Rollout
from alignkit.config import AlgorithmConfig, RewardConfig, store_algorithm, store_reward
from alignkit.context import RunContext
from alignkit.errors import ConfigError, PluginError
from alignkit.hookspecs import hookimpl
from alignkit.needs import AlgorithmNeeds, Artifacts
from alignkit.registry import ComponentRegistry

__all__ = [
    "AlgorithmConfig",
    "AlgorithmNeeds",
    "Artifacts",
    "ComponentRegistry",
    "ConfigError",
    "PluginError",
    "RewardConfig",
    "Rollout",
    "RunContext",
    "hookimpl",
    "store_algorithm",
    "store_reward",
]
__version__ = "0.1.0"
