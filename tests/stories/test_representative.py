"""Which version represents a story: the rule alone decides, never the order in which
partners' servers answered (pure, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import permutations

import pytest

from clusterfeed.stories.representative import Version, representative_first, version_order

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)

# The cluster office's short note came last; a partner's full release came first.
FULL_TEXT = "<p>" + "x" * 900 + "</p>"
PARTNER = Version("Helix Vektor", "guid:hv", T0, "Helix Vektor opens a plant.", FULL_TEXT)
OFFICE = Version("BioRegion Nord", "guid:br", T0 + timedelta(hours=3), "Plant opens.")
PRESS = Version("Elbmed Pharma", "guid:ep", T0 + timedelta(hours=1), "A plant opens, 40 jobs.")


def _shown(versions: list[Version], rule: str, own: tuple[str, ...] = ()) -> list[str]:
    return [versions[i].feed for i in representative_first(versions, rule, own)]


@pytest.mark.parametrize(
    ("rule", "own", "first"),
    [
        ("earliest", (), "Helix Vektor"),
        ("complete", (), "Helix Vektor"),
        ("own", ("BioRegion Nord",), "BioRegion Nord"),
        ("own", (), "Helix Vektor"),  # no own version: the most complete
    ],
)
def test_the_rule_picks_the_representative_and_the_rest_follow_by_time(
    rule: str, own: tuple[str, ...], first: str
) -> None:
    for order in permutations([PARTNER, OFFICE, PRESS]):
        shown = _shown(list(order), rule, own)
        assert shown[0] == first
        rest = [v for v in (PARTNER, PRESS, OFFICE) if v.feed != first]
        assert shown[1:] == [v.feed for v in rest]


def test_equally_complete_versions_go_to_the_earliest_then_by_feed_name() -> None:
    a = Version("B feed", "1", T0, "same length")
    b = Version("A feed", "2", T0, "same length")
    c = Version("0 feed", "3", T0 + timedelta(minutes=1), "same length")
    for order in permutations([a, b, c]):
        assert _shown(list(order), "complete") == ["A feed", "B feed", "0 feed"]


def test_version_order_is_the_rule_ready_for_the_store() -> None:
    order = version_order("own", iter(["BioRegion Nord"]))
    versions = [PARTNER, OFFICE]
    assert [versions[i].feed for i in order(versions)] == ["BioRegion Nord", "Helix Vektor"]
    assert representative_first([]) == []
