"""Tasks: prompt sets with a gold preference oracle that every stage is evaluated against."""

from __future__ import annotations

from alignkit.tasks.assist import (
    DEFAULT_MIX,
    KINDS,
    QUALITIES,
    REFUSALS,
    AssistTask,
    Demonstration,
    PromptRecord,
    SimulatedHuman,
)

# Registry of built-in tasks by name; config files refer to tasks by these names.
TASKS: dict[str, type[AssistTask]] = {AssistTask.name: AssistTask}


def get_task(name: str, **kwargs: object) -> AssistTask:
    """Instantiate the task registered as ``name`` with ``kwargs``.

    Raises ``ValueError`` listing the known task names when ``name`` is not registered.
    """
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
    return cls(**kwargs)  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_MIX",
    "KINDS",
    "QUALITIES",
    "REFUSALS",
    "TASKS",
    "AssistTask",
    "Demonstration",
    "PromptRecord",
    "SimulatedHuman",
    "get_task",
]
