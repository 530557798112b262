"""Reading recipes: YAML through OmegaConf, ``key=value`` overrides, interpolation; writing them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmexit.errors import RecipeError
from mmexit.files import atomic_write_text


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML recipe, apply ``key=value`` overrides, resolve interpolations; a plain dict.

    Validation against the task's schema is a separate step (``validate_recipe``).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file does not exist: {path}")
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and OmegaConf errors alike
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"{path}: not a valid YAML recipe: {first_line}") from None
    for override in overrides or []:
        if "=" not in override:
            raise RecipeError(f"override '{override}': expected key=value (e.g. train.epochs=3)")
        key, _, raw = override.partition("=")
        try:
            value = _parse_scalar(raw)
            OmegaConf.update(config, key.strip(), value, merge=True, force_add=True)
        except OmegaConfBaseException as error:
            raise RecipeError(f"override '{override}': {str(error).splitlines()[0]}") from None
    try:
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        raise RecipeError(f"{path}: cannot resolve interpolation: {str(error).splitlines()[0]}") from None


def _parse_scalar(raw: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists, strings)."""
    import yaml

    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def save_recipe(recipe: dict, path: Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""

    atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.create(recipe)))
