"""The recipe schema language: fields, components and lists, validation, and building components.

A recipe is validated against a schema before any work starts. A schema is a nested dict whose
leaves are ``Field``s (plain values) or ``Component``s (a dict naming a class, either by a short
name from ``mmexit.recipe.components.COMPONENTS`` or by a dotted ``_target_`` path, plus its keyword
arguments, which are checked against the class's signature). Every problem is raised as one
``RecipeError`` line naming the key path and what is allowed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin

from mmexit.errors import RecipeError
from mmexit.recipe.components import COMPONENTS

_MISSING = object()


@dataclass
class Field:
    """A plain recipe value.

    types: accepted Python types (int is accepted where float is).
    required: the recipe must set it (no default).
    choices: allowed values, when the set is closed.
    must_exist: the value is a path that must exist (relative paths: to the working directory).
    check: extra validation, returns an error text or None.
    schema: for a mapping value, a nested schema its keys follow (defaults filled in, errors name
    ``path.key``); with ``nullable``, an optional section (null: off).
    """

    types: tuple[type, ...]
    default: Any = _MISSING
    required: bool = False
    choices: Optional[tuple] = None
    must_exist: bool = False
    nullable: bool = False
    doc: str = ""
    check: Optional[Callable[[Any], Optional[str]]] = None
    schema: Optional[dict] = None


@dataclass
class Component:
    """A recipe value that names a component of ``kind`` (a key of COMPONENTS) with its arguments."""

    kind: str
    default: Any = _MISSING
    reserved: dict = field(default_factory=dict)
    required: bool = False
    nullable: bool = False
    doc: str = ""


@dataclass
class ListOf:
    """A list whose every item follows ``item`` (a Field, Component or nested schema dict)."""

    item: Any
    default: Any = _MISSING
    required: bool = False
    doc: str = ""
    extra: dict = field(default_factory=dict)
    check: Optional[Callable[[Any], Optional[str]]] = None


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; allowed: {', '.join(sorted(allowed))}"


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def _coerce_yaml(value: Any, spec: Field) -> Any:
    """Undo YAML 1.1's readings: ``1e-5`` (no dot) is a string, accepted where a float is expected;
    ``no`` / ``off`` are False, accepted where they are one of a string field's choices."""
    types = spec.types
    if value is False and str in types and bool not in types and spec.choices:
        for word in ("no", "off"):
            if word in spec.choices:
                return word
    if float in types and str not in types and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validate(config: Any, schema: Any, path: str = "") -> Any:
    """Return ``config`` with defaults filled in, or raise RecipeError naming the first problem."""
    if isinstance(schema, dict):
        return _validate_section(config, schema, path)
    if isinstance(schema, Field):
        return _validate_field(config, schema, path)
    if isinstance(schema, Component):
        return validate_component(config, schema.kind, path, schema.reserved)
    if isinstance(schema, ListOf):
        if not isinstance(config, list):
            raise RecipeError(f"{path}: expected a list, got {type(config).__name__} {config!r}")
        if schema.check is not None and schema.check(config):
            raise RecipeError(f"{path}: {schema.check(config)}")
        return [validate(item, schema.item, f"{path}[{index}]") for index, item in enumerate(config)]
    raise TypeError(f"bad schema node at {path}: {schema!r}")


def _validate_section(config: Any, schema: dict, path: str) -> dict:
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping of keys, got {config!r}")
    allowed = list(schema)
    for key in config:
        if key not in schema:
            where = f"{path}.{key}" if path else str(key)
            raise RecipeError(f"{where}: unknown key{_suggest(str(key), allowed)}")
    result = {}
    for key, node in schema.items():
        where = f"{path}.{key}" if path else key
        if key in config:
            value = config[key]
            if value is None and getattr(node, "nullable", False):
                result[key] = None
                continue
            result[key] = validate(value, node, where)
        elif isinstance(node, dict):
            result[key] = _validate_section({}, node, where)
        elif getattr(node, "required", False):
            raise RecipeError(f"{where}: required key is missing{_doc(node)}")
        elif node.default is not _MISSING:
            default = node.default
            if isinstance(node, Component) and default is not None:
                default = validate_component(default, node.kind, where)
            result[key] = default
        else:
            result[key] = None
    return result


def _doc(node: Any) -> str:
    return f" ({node.doc})" if getattr(node, "doc", "") else ""


def _validate_field(value: Any, spec: Field, path: str) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise RecipeError(f"{path}: must be set, expected {_type_names(spec.types)}")
    value = _coerce_yaml(value, spec)
    if not _type_ok(value, spec.types):
        raise RecipeError(
            f"{path}: expected {_type_names(spec.types)}, got {type(value).__name__} {value!r}"
        )
    if float in spec.types and isinstance(value, int) and not isinstance(value, bool) and int not in spec.types:
        value = float(value)
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(
            f"{path}: {value!r} is not allowed{hint}; allowed: {', '.join(map(str, spec.choices))}"
        )
    if spec.schema is not None and isinstance(value, dict):
        value = _validate_section(value, spec.schema, path)
    if spec.must_exist and not Path(str(value)).expanduser().exists():
        raise RecipeError(f"{path}: file or folder does not exist: {value}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise RecipeError(f"{path}: {problem}")
    return value


# ----------------------------------------------------------------------------------- components


def _component_table() -> dict[str, dict[str, str]]:
    return COMPONENTS


def resolve_component_class(spec: dict, kind: str, path: str) -> type:
    """The class a component spec names, by short ``name`` or dotted ``_target_``."""
    table = _component_table().get(kind, {})
    if "_target_" in spec:
        target = spec["_target_"]
        module_name, _, attribute = str(target).rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError):
            raise RecipeError(f"{path}._target_: cannot import '{target}'") from None
    if "name" not in spec:
        raise RecipeError(
            f"{path}: a {kind} needs 'name' (one of: {', '.join(sorted(table))}) or a dotted '_target_'"
        )
    name = spec["name"]
    if name not in table:
        raise RecipeError(f"{path}.name: unknown {kind} '{name}'{_suggest(str(name), list(table))}")
    module_name, _, attribute = table[name].rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def validate_component(spec: Any, kind: str, path: str, reserved: dict | None = None) -> dict:
    """Check a component spec: known class, known keyword arguments of accepted types.

    ``reserved`` maps extra keys the runner (not the class) reads, e.g. a rule's ``sweep``, to
    their schema nodes; they are validated with those and kept in the returned dict.
    """
    reserved = reserved or {}
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise RecipeError(f"{path}: expected a {kind} as a mapping with 'name', got {spec!r}")
    cls = resolve_component_class(spec, kind, path)
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    hints = _type_hints(cls.__init__)
    checked = dict(spec)
    for key, node in reserved.items():
        if key in spec:
            checked[key] = None if spec[key] is None else validate(spec[key], node, f"{path}.{key}")
        else:
            checked[key] = _validate_section({}, node, f"{path}.{key}") if isinstance(node, dict) else node.default if node.default is not _MISSING else None
    for key, value in spec.items():
        if key in ("name", "_target_") or key in reserved:
            continue
        if key not in parameters:
            raise RecipeError(f"{path}.{key}: unknown argument of {kind} '{spec.get('name', cls.__name__)}'"
                              f"{_suggest(str(key), list(parameters) + list(reserved))}")
        expected = hints.get(key)
        if expected is not None and not _matches_annotation(value, expected):
            raise RecipeError(
                f"{path}.{key}: expected {_annotation_name(expected)}, got {type(value).__name__} {value!r}"
            )
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name not in spec:
            raise RecipeError(f"{path}.{name}: required argument of {kind} '{spec.get('name', cls.__name__)}' is missing")
    return checked


def _type_hints(function: Callable) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(function)
    except Exception:  # unresolvable forward references: skip type checks
        return {}


def _matches_annotation(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches_annotation(value, arg) for arg in get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _annotation_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build_component(
    spec: dict, kind: str, path: str = "", reserved: tuple[str, ...] = (), **extra: Any
) -> Any:
    """Instantiate a validated component spec; ``extra`` adds arguments the runner supplies.

    Keys in ``reserved`` (read by the runner, not the class) are left out of the arguments.
    """
    cls = resolve_component_class(spec, kind, path)
    skip = {"name", "_target_", *reserved}
    arguments = {key: value for key, value in spec.items() if key not in skip}
    return cls(**arguments, **extra)
