"""Small helpers for the words clusterfeed prints and logs.

Operators read these lines; "1 deliveries" or "1 feeds" makes a tool look careless,
so every count that is printed goes through :func:`plural`.
"""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is one.

    English plural rules for the nouns we count (feed → feeds, delivery → deliveries,
    address → addresses); ``many`` names an irregular plural.
    """
    if count == 1:
        return f"1 {noun}"
    if many is None:
        if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
            many = noun[:-1] + "ies"
        elif noun.endswith(("s", "x", "z", "ch", "sh")):
            many = noun + "es"
        else:
            many = noun + "s"
    return f"{count} {many}"
