"""The configuration reference page, written from the schema itself.

``lpreg config --reference`` writes ``render()`` to docs/configuration.md; a test fails
when the committed page and the schema disagree. Everything on the page comes from
conf/schema.py: each key's type, default, choices or range, and its meaning (the
``doc`` of its field's metadata); each section's description is its class's docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conf.schema import LpregConfig, Range

REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "lpreg config --reference"


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: Any
    allowed: str
    meaning: str | None


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    about: str
    keys: list[KeyDoc]


def sections(node: Any = None, prefix: str = "") -> Iterator[Section]:
    """Each section of the schema with its own keys, a nested section right after its parent."""
    node = LpregConfig() if node is None else node
    keys, nested = [], []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((value, f"{prefix}{f.name}"))
        else:
            keys.append(KeyDoc(key=f"{prefix}{f.name}", type=_type_name(f.type), default=value,
                               allowed=_allowed(f), meaning=f.metadata.get("doc")))
    if prefix:
        yield Section(prefix.rstrip("."), _about(type(node)), keys)
    for value, name in nested:
        yield from sections(value, name + ".")


def missing_meanings() -> list[str]:
    """Keys without a meaning, and sections without a docstring of their own."""
    missing = [k.key for s in sections() for k in s.keys if not (k.meaning or "").strip()]
    return missing + [f"{s.name} (section docstring)" for s in sections() if not s.about]


def _about(cls: type) -> str:
    """The class's own docstring, first paragraph, on one line; "" for the one dataclass writes."""
    text = inspect.cleandoc(cls.__doc__ or "")
    if text.startswith(cls.__name__ + "("):
        return ""
    return " ".join(text.split("\n\n")[0].split()).replace("``", "`")


def _type_name(annotation: Any) -> str:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return name.replace(" | None", " or null")


def _allowed(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return ", ".join(f"`{yaml_value(c)}`" for c in f.metadata["choices"])
    if "range" in f.metadata:
        bounds: Range = f.metadata["range"]
        return bounds.describe()
    return ""


def yaml_value(value: Any) -> str:
    """A default as it reads in YAML (and in ``lpreg config``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value)


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: no column break, no HTML tag, no emphasis."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text.replace("|", r"\|").replace("*", r"\*"))


def _code(text: str) -> str:
    """``text`` as inline code, even when it holds backticks (a Markdown fence as a default)."""
    if "`" not in text:
        return f"`{text}`"
    return f"`` {text} ``"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from conf/schema.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key lpreg knows, with its type, default, allowed values and meaning. This page is",
        "generated from the schema (`conf/schema.py`): to change it, change the schema and run",
        f"`{REGENERATE}`; a test fails while the two disagree.",
        "",
        "Set keys in a recipe (`-c RECIPE`) or on the command line as `key=value`;",
        "`lpreg config [-c RECIPE] [key=value ...]` prints the config they make. Each value is",
        "checked against its allowed values when the config loads, and so are the combinations",
        "no single key can judge (see `conf/validate.py`). `null` is YAML's None.",
        "",
    ]
    for section in sections():
        lines += [f"## {section.name}", ""]
        if section.about:
            lines += [section.about, ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for k in section.keys:
            cells = (f"`{k.key}`", _cell(k.type), _code(yaml_value(k.default)), _cell(k.allowed),
                     _cell(k.meaning or ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
