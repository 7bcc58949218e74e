"""Writes docs/configuration.md from the config model, so the reference cannot drift.

Every key, its type, its default and its meaning come from ``config.Config`` (the
meaning is the docstring under each field in config.py); the prose around the tables
is in ``docgen_text``. ``python -m clusterfeed.docgen`` rewrites the page,
``--check`` only says whether it is current (the test suite does the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from clusterfeed.config import Config
from clusterfeed.docgen_text import DEFAULT_WORDS, INTRO, SECTIONS

PAGE = Path("docs") / "configuration.md"
COMMAND = ".venv/bin/python -m clusterfeed.docgen"


class UndocumentedError(Exception):
    """The model has a key or a section the page would not describe."""


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` is ``X`` for the reader: every optional key says "none" as default."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: a table (``X``, ``X | None``) or a list of tables."""
    annotation = _strip_optional(annotation)
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_words(annotation: Any) -> str:
    """A field's type as an operator reads it (TOML words, not Python's)."""
    annotation = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_words(typing.get_args(annotation)[0])
    if origin is Literal:
        values = [json.dumps(v) for v in typing.get_args(annotation)]
        return "one of " + ", ".join(f"`{v}`" for v in values)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if typing.get_origin(inner) is tuple:
            return "list of pairs of texts"
        if _model_of(inner) is not None:
            return "list of tables"
        return f"list of {_type_words(inner)}s"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    names = {bool: "true/false", int: "integer", float: "number", str: "text", Path: "path"}
    if annotation in names:
        return names[annotation]
    raise UndocumentedError(f"no words for the type {annotation!r}: add them in docgen.py")


def _number(value: float) -> str:
    """``30.0`` as ``30``, ``0.1`` as ``0.1``, ``10_000_000`` in full."""
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


def _bounds(field: FieldInfo) -> str:
    """The limits pydantic enforces (``ge``/``gt``/``le``/``lt``), in words."""
    low = high = ""
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = _number(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            low = f"more than {_number(item.gt)}"  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = _number(item.le)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            high = f"less than {_number(item.lt)}"  # type: ignore[arg-type]
    if low and high:
        return f"{low}, at most {high}" if low.startswith("more") else f"{low} to {high}"
    if low:
        return f"{low} or more" if not low.startswith("more") else low
    if high:
        return f"at most {high}" if not high.startswith("less") else high
    return ""


def _default_words(path: str, field: FieldInfo) -> str:
    """The default as TOML would spell it, or the words that say what happens instead."""
    if path in DEFAULT_WORDS:
        return DEFAULT_WORDS[path]
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (int, float)):
        return f"`{_number(value)}`"
    if isinstance(value, (str, Path)):
        return f"`{json.dumps(str(value), ensure_ascii=False)}`"
    if isinstance(value, list) and not value:
        return "`[]`"
    raise UndocumentedError(
        f"{path}: no words for the default {value!r}: add them to DEFAULT_WORDS"
    )


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every table of the config by its TOML path (``""``, ``mail``, ``mail.dkim``, …)."""
    found: dict[str, type[BaseModel]] = {"": root}
    pending = [("", root)]
    while pending:
        prefix, model = pending.pop()
        for name, field in model.model_fields.items():
            inner = _model_of(field.annotation)
            if inner is not None and not field.exclude:
                path = f"{prefix}.{field.alias or name}".lstrip(".")
                found[path] = inner
                pending.append((path, inner))
    return found


def table(path: str, model: type[BaseModel]) -> str:
    """The key table of one section."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = field.alias or name
        full = f"{path}.{key}".lstrip(".")
        inner = _model_of(field.annotation)
        if path == "" and inner is not None:
            continue  # a section of its own
        if not field.description:
            raise UndocumentedError(
                f"config key {full} has no description: write one as a docstring under "
                f"the field in src/clusterfeed/config.py, then run {COMMAND}"
            )
        shown = f"`[{full}]`" if inner is not None else f"`{key}`"
        kind = _type_words(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind = f"{kind}, {bounds}"
        default = _default_words(full, field)
        rows.append(f"| {shown} | {kind} | {_cell(default)} | {_cell(field.description)} |")
    return "\n".join(rows)


def generate(root: type[BaseModel] = Config) -> str:
    """The whole page. Raises UndocumentedError for a table or key without words."""
    models = _models(root)
    documented = {section.path for section in SECTIONS}
    for path, model in models.items():
        same = [p for p in documented if models.get(p) is model]
        if path not in documented and not same:
            raise UndocumentedError(
                f"the config table [{path}] has no section in docgen_text.SECTIONS: add one"
            )
    unknown = documented - set(models)
    if unknown:
        raise UndocumentedError(f"docgen_text.SECTIONS names tables the config lacks: {unknown}")
    for path in DEFAULT_WORDS:
        prefix, _, key = path.rpartition(".")
        fields = models[prefix].model_fields if prefix in models else {}
        if not any((f.alias or n) == key for n, f in fields.items()):
            raise UndocumentedError(f"DEFAULT_WORDS names {path}, which the config lacks")
    parts = [
        "<!-- Generated by `python -m clusterfeed.docgen` from the config model"
        " (src/clusterfeed/config.py) and src/clusterfeed/docgen_text.py. Edit those. -->",
        INTRO.strip(),
    ]
    for section in SECTIONS:
        parts.append(f"## {section.heading}")
        if section.before:
            parts.append(section.before.strip())
        parts.append(table(section.path, models[section.path]))
        if section.after:
            parts.append(section.after.strip())
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clusterfeed.docgen", description="Write docs/configuration.md."
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository's folder")
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args(argv)
    target = args.root / PAGE
    text = generate()
    current = target.read_text(encoding="utf-8") if target.exists() else ""
    if args.check:
        if current != text:
            print(f"{PAGE} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
