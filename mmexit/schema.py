"""``python -m mmexit.schema``: every recipe key of every task, as Markdown tables."""

from __future__ import annotations

from mmexit.recipe.language import Component, ListOf
from mmexit.recipe.tasks import TASKS, schema_for_task


def describe(schema: dict, prefix: str = "") -> list[str]:
    """Markdown table rows ``| key | type | default | meaning |`` for every key of a schema."""
    lines = []
    for key, node in schema.items():
        path = f"{prefix}{key}"
        if isinstance(node, dict):
            lines += describe(node, f"{path}.")
            continue
        if isinstance(node, Component):
            kind, default = f"{node.kind} component", node.default
        elif isinstance(node, ListOf):
            item = node.item
            kind = "list of " + (f"{item.kind} components" if isinstance(item, Component) else "items")
            default = node.default
        else:
            kind = " or ".join(t.__name__ for t in node.types)
            if node.choices:
                kind += ": " + " / ".join(map(str, node.choices))
            default = node.default
        shown = "**required**" if getattr(node, "required", False) else f"`{default}`"
        lines.append(f"| `{path}` | {kind} | {shown} | {getattr(node, 'doc', '')} |")
        if getattr(node, "schema", None):  # an optional section: its keys
            lines += describe(node.schema, f"{path}.")
    return lines


def tables() -> str:
    """One table per task."""
    parts = []
    for task in TASKS:
        parts.append(f"## task: {task}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        parts.append("\n".join(describe(schema_for_task(task))) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(tables())
