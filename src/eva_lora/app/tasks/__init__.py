"""Tasks by name: GLUE (classification/regression) and generation (math, common sense, code)."""

from __future__ import annotations

from .base import BUNDLED_DATA, DataError, Task, load_table
from .code import CODE_TASKS
from .generation import GENERATION_TASKS
from .glue import GLUE_TASKS

TASKS: dict[str, Task] = {**GLUE_TASKS, **GENERATION_TASKS, **CODE_TASKS}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name lists the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


def eval_tasks(name: str) -> list[Task]:
    """Tasks evaluated for ``name``: a joint task's parts (the 7 common-sense tests), or itself."""
    task = get_task(name)
    return [TASKS[n] for n in task.parts] if task.parts else [task]


__all__ = ["BUNDLED_DATA", "DataError", "TASKS", "Task", "eval_tasks", "get_task", "load_table"]
