"""The tuning / held-out split of the labelled sets (tests/data/stories/README.md)."""

from __future__ import annotations

from pathlib import Path

from clusterfeed.stories.benchmark import cycles_of, load_rows, part_of, select

LABELLED = Path(__file__).resolve().parent.parent / "data" / "stories"


def test_no_story_has_items_on_both_sides_and_the_split_is_fixed() -> None:
    rows, _ = load_rows(LABELLED)
    tuning, held_out = select(rows, part="tuning"), select(rows, part="held-out")
    assert {r.story for r in tuning}.isdisjoint({r.story for r in held_out})
    assert len(tuning) + len(held_out) == len(rows)
    # About 30 % of the stories are held out, and the same ones every time.
    stories = {r.story for r in rows}
    share = sum(part_of(s) == "held-out" for s in stories) / len(stories)
    assert 0.2 < share < 0.4
    assert part_of("a-001") == part_of("a-001")


def test_cycles_keep_every_item_once() -> None:
    rows, _ = load_rows(LABELLED)
    for cycles in (cycles_of(rows, 7), cycles_of(rows, 7, shuffle_seed=1)):
        assert len(cycles) == 7
        assert sorted(r.id for c in cycles for r in c) == sorted(r.id for r in rows)
    ordered = [r for c in cycles_of(rows, 7) for r in c]
    assert ordered == sorted(rows, key=lambda r: (r.published, r.id))


def test_the_split_file_lists_the_held_out_stories() -> None:
    """split.json is what part_of says: a reader sees the split without running code."""
    import json

    rows, _ = load_rows(LABELLED)
    listed = json.loads((LABELLED / "split.json").read_text(encoding="utf-8"))["held_out"]
    assert listed == sorted({r.story for r in rows if part_of(r.story) == "held-out"})
