"""``clusterfeed stories split URL``: an operator takes an item out of a wrong story.

Through the real command line, on the bundled example fetched over HTTP: splitting the
last item of a story the matcher joined (in the example: the Summit programme and
KristallWerk's "meet us at the Summit", a known false merge) must make it a story of
its own and keep it so when the match step runs again and after a restart.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from clusterfeed.config import load_config
from clusterfeed.store import SCHEMA_VERSION, Store, story_corrections
from clusterfeed.stories.matcher import StoryMatcher
from clusterfeed.stories.split import apart_pairs, page_key
from tests.test_store import _back_to_version_8


def _stories(run_cli: Any, config: Path) -> list[dict[str, Any]]:
    result = run_cli("stories", "--json", "--config", config)
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def _story_of(stories: list[dict[str, Any]], link: str) -> dict[str, Any]:
    return next(s for s in stories if any(i["link"] == link for i in s["items"]))


def _joined_story(stories: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """A story of two or more partners, and the link of its last item."""
    story = next(s for s in stories if len({i["feed"] for i in s["items"]}) == 2)
    return story, story["items"][-1]["link"]


def test_split_takes_an_item_out_and_keeps_it_out(example_config: Path, run_cli: Any) -> None:
    started = datetime.now(UTC)
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    before = _stories(run_cli, example_config)
    story, link = _joined_story(before)
    others = {i["link"] for i in story["items"]} - {link}

    result = run_cli("stories", "split", link, "--config", example_config)
    assert result.exit_code == 0, result.output
    assert "is now a story of its own" in result.stdout

    after = _stories(run_cli, example_config)
    alone = _story_of(after, link)
    assert [i["link"] for i in alone["items"]] == [link]
    assert alone["items"][0]["joined_because"] is None
    old = _story_of(after, sorted(others)[0])
    assert old["id"] == story["id"]  # the story that stays keeps its Atom id
    assert {i["link"] for i in old["items"]} == others
    assert len(after) == len(before) + 1

    # The match step runs again over the same cycle (as after a crash between storing
    # and matching): the split item is a new one-item story again, and only the stored
    # correction keeps it from rejoining.
    config = load_config(example_config)
    store = Store(config.store.url)
    try:
        store.join_new_stories(started, StoryMatcher())
    finally:
        store.close()
    rematched = _stories(run_cli, example_config)
    assert [i["link"] for i in _story_of(rematched, link)["items"]] == [link]

    # A restart and another cycle change nothing.
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    assert [i["link"] for i in _story_of(_stories(run_cli, example_config), link)["items"]] == [
        link
    ]

    again = run_cli("stories", "split", link, "--config", example_config)
    assert again.exit_code == 0
    assert "already a story of its own" in again.stdout


def test_split_of_an_unknown_link_is_an_operator_error(example_config: Path, run_cli: Any) -> None:
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    result = run_cli(
        "stories", "split", "https://nowhere.example/news/1", "--config", example_config
    )
    assert result.exit_code == 2
    assert "no stored item has the link https://nowhere.example/news/1" in result.output
    assert "clusterfeed stories" in result.output


def test_apart_pairs_are_sorted_and_skip_the_page_itself() -> None:
    assert apart_pairs(["b.example/2"], ["a.example/1", "b.example/2", "c.example/3"]) == {
        ("a.example/1", "b.example/2"),
        ("b.example/2", "c.example/3"),
    }
    assert page_key(" https://www.A.example/x/ ") == page_key("http://a.example/x")


def test_a_version_8_database_gets_the_corrections_table(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.migrate()
        with store.engine.begin() as conn:
            _back_to_version_8(conn)
        assert store.schema_version() == 8
        assert store.migrate() == SCHEMA_VERSION
        with store.engine.connect() as conn:
            assert conn.execute(select(story_corrections)).all() == []
    finally:
        store.close()
