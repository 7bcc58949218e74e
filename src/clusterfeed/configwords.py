"""Config problems in an operator's words.

The people who edit the config are communications managers. pydantic's messages
("Input should be a valid integer, unable to parse string as an integer") and list
indexes ("feeds[0].langauge") are for programmers; these functions turn them into the
feed's name and a sentence that says what to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_ENTRY = re.compile(r"^(?P<table>[A-Za-z_]+)\[(?P<index>\d+)\](?:\.(?P<rest>.+))?$")


def shown(value: Any) -> str:
    """A value from the file as the operator wrote it: strings in double quotes."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def located(key: str, raw: Mapping[str, Any]) -> str:
    """Where a key is, named the way the operator knows it.

    ``feeds[0].language`` becomes ``feeds "Kieler MedTech" (entry 1), language``: the
    entry's name (or a subscriber's email) and its position counted from one.
    """
    match = _ENTRY.match(key)
    if match is None:
        return key
    table, index, rest = match["table"], int(match["index"]), match["rest"]
    entries = raw.get(table)
    entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
    label = None
    if isinstance(entry, Mapping):
        label = next(
            (v for k in ("name", "email") if isinstance(v := entry.get(k), str) and v), None
        )
    head = f'{table} "{label}" (entry {index + 1})' if label else f"{table} entry {index + 1}"
    return f"{head}, {rest}" if rest else head


def _limit(ctx: Mapping[str, Any], *keys: str) -> Any:
    return next((ctx[k] for k in keys if k in ctx), None)


def sentence(kind: str, msg: str, ctx: Mapping[str, Any] | None, value: Any) -> str:
    """What is wrong with ``value`` and what to write instead, for pydantic's error ``kind``.

    ``msg`` (pydantic's own text) is used only for our validators' messages, which are
    written for operators already, and as the last resort for a kind not known here.
    """
    ctx = ctx or {}
    found = f"found {shown(value)}; " if value is not None else ""
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{found}write a whole number without quotes, such as 30"
    if kind in ("float_parsing", "float_type"):
        return f"{found}write a number without quotes, such as 2.5"
    if kind in ("bool_parsing", "bool_type"):
        return f"{found}write true or false, without quotes"
    if kind == "string_type":
        return f"{found}write text in double quotes"
    if kind in ("list_type", "tuple_type", "set_type"):
        return f'{found}write a list in square brackets, such as ["research", "medtech"]'
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{found}write a table here (a [section] with keys), not a single value"
    if kind in ("greater_than_equal", "greater_than"):
        word = "at least" if kind == "greater_than_equal" else "more than"
        return f"{found}use a number {word} {_limit(ctx, 'ge', 'gt')}"
    if kind in ("less_than_equal", "less_than"):
        word = "at most" if kind == "less_than_equal" else "less than"
        return f"{found}use a number {word} {_limit(ctx, 'le', 'lt')}"
    if kind in ("string_too_short", "too_short"):
        return f"{found}this must not be empty"
    if kind in ("string_too_long", "too_long"):
        return f"{found}this is too long: at most {_limit(ctx, 'max_length')} allowed"
    if kind in ("literal_error", "enum") and ctx.get("expected"):
        return f"{found}use one of {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return f"{found}this has characters that are not allowed here"
    text = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if ctx.get("expected"):
        text = f"expected {ctx['expected']}"
    return f"{found}{text}"
