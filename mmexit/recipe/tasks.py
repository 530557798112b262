"""The one explicit table of tasks a recipe may name, and validation of a recipe against its task.

A task is named by ``task:`` in a recipe. Each entry points, by dotted path, at the task's schema
(next to the task in ``mmexit/tasks/``) and at its implementation (``mmexit.tasks.base.Task``).
Nothing registers itself on import: to add a task, add a line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmexit.errors import RecipeError
from mmexit.recipe.language import validate

#: task name -> (schema dict, Task class), as dotted paths
TASKS: dict[str, tuple[str, str]] = {
    "text_classification": ("mmexit.tasks.text_schema.TEXT_SCHEMA",
                            "mmexit.tasks.text_classification.TextClassificationTask"),
    "captioning": ("mmexit.tasks.caption_schema.CAPTIONING_SCHEMA", "mmexit.tasks.captioning.CaptioningTask"),
}


def _load(dotted: str) -> Any:
    module, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def _entry(task: object) -> tuple[str, str]:
    if task not in TASKS:
        raise RecipeError(f"task: {task!r} is not allowed; allowed: {', '.join(TASKS)}")
    return TASKS[task]


def schema_for_task(task: object) -> dict:
    """The schema of a recipe's ``task``."""
    return _load(_entry(task)[0])


def task_for(task: object):
    """An instance of the task's implementation."""
    return _load(_entry(task)[1])()


def validate_recipe(recipe: Any) -> dict:
    """Validate a loaded recipe against the schema of its ``task``; return it with defaults filled in."""

    if not isinstance(recipe, dict):
        raise RecipeError("recipe: expected a mapping at the top level")
    return validate(recipe, schema_for_task(recipe.get("task", "text_classification")))
