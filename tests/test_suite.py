"""Rules for the test suite itself: nothing in it may depend on how fast the machine is."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent


def test_hypothesis_runs_without_a_deadline_for_the_whole_suite() -> None:
    assert settings.default.deadline is None


@given(st.integers())
def test_a_property_test_without_its_own_settings_has_no_deadline(value: int) -> None:
    # What test_compose's unsubscribe-header property saw: the default settings.
    assert settings().deadline is None


def test_no_test_sets_a_deadline_of_its_own() -> None:
    timed = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            unlimited = isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant)
            if (
                isinstance(node, ast.keyword)
                and node.arg == "deadline"
                and not (
                    unlimited and node.value.value is None  # type: ignore[attr-defined]
                )
            ):
                timed.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert timed == []


def test_counts_are_printed_with_the_right_plural() -> None:
    from clusterfeed.words import plural

    assert [plural(n, "feed") for n in (0, 1, 2)] == ["0 feeds", "1 feed", "2 feeds"]
    assert plural(1, "delivery") == "1 delivery" and plural(3, "delivery") == "3 deliveries"
    assert plural(2, "address") == "2 addresses" and plural(2, "day") == "2 days"
    assert plural(2, "story") == "2 stories" and plural(2, "new item") == "2 new items"
