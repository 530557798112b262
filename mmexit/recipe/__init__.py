"""Recipes: the schema language, YAML loading with overrides, the component and task tables."""

from mmexit.recipe.language import build_component, validate
from mmexit.recipe.loading import load_recipe, save_recipe
from mmexit.recipe.tasks import schema_for_task, task_for, validate_recipe

__all__ = ["build_component", "validate", "load_recipe", "save_recipe", "schema_for_task", "task_for",
           "validate_recipe"]
