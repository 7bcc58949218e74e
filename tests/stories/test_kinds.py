"""A newsletter issue lists other stories and is none of them.

On the bundled example the matcher joined NordBio's Newsletter 11/2026 with Kansai's
mail magazine of the same month (two publishers' issues, a hard negative of the
example's key) and Newsletter 10/2026 with the Keiko Brandt item it mentions. The rule
(``clusterfeed.stories.kinds``, applied in ``stories.score.veto``): a roundup is one story
only with another roundup of the same site.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from clusterfeed.stories.features import Evidence, ItemFeatures, StoryItem, evidence
from clusterfeed.stories.kinds import notice_kind, publisher
from clusterfeed.stories.score import veto

WHEN = datetime(2026, 11, 3, 9, tzinfo=UTC)


def _item(feed: str, language: str, title: str, link: str) -> ItemFeatures:
    item = StoryItem(feed, feed, language, title, "Lead text of the item.", link, WHEN)
    return ItemFeatures(feed, language, WHEN, np.ones(4, dtype=np.float32), evidence(item))


def test_roundups_are_told_by_their_titles() -> None:
    for title in (
        "NordBio Newsletter 11/2026",
        "Newsletter January 2026: gene therapy in Hamburg",
        "メールマガジン 2026年11月号を発行しました",
        "Unser Rundbrief im Dezember",
        "Weekly round-up: five deals",
    ):
        assert notice_kind(title) == "roundup", title
    for title in (
        "Keiko Brandt heads NordBio's new international desk",
        "Meet us at the Hanse Life Science Summit",
        "Newsletters are not a word here: Newsletterversand",
    ):
        assert notice_kind(title) is None, title


def test_a_roundup_joins_only_its_own_publishers_other_issue() -> None:
    de = _item(
        "NordBio (de)", "de", "NordBio Newsletter 11/2026", "https://www.nordbio.example/de/nl-11"
    )
    en = _item(
        "NordBio (en)", "en", "Newsletter November 2026", "https://nordbio.example/en/nl-nov"
    )
    kansai = _item(
        "Kansai", "ja", "メールマガジン 2026年11月号", "https://kansai-bio.example/mm/11"
    )
    event = _item(
        "NordBio (en)", "en", "Keiko Brandt heads the desk", "https://www.nordbio.example/en/kb"
    )
    assert veto(de, en) is None
    assert veto(de, kansai) == "two publishers' newsletters"
    assert veto(kansai, de) == "two publishers' newsletters"
    assert veto(de, event) == "a newsletter issue is not one of the events it lists"
    assert veto(event, de) == "a newsletter issue is not one of the events it lists"
    assert publisher(None, "Kansai") == "feed:Kansai"


def test_evidence_stored_before_kinds_reads_back_as_no_kind() -> None:
    stored = _item("A", "en", "Newsletter 1", "https://a.example/1").evidence.to_json()
    assert Evidence.from_json(stored).kind == "roundup"
    del stored["kind"]
    assert Evidence.from_json(stored).kind is None


def test_the_example_keeps_newsletters_apart_from_what_they_list(
    example_config: Path, run_cli: Any
) -> None:
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    result = run_cli("stories", "--json", "--config", example_config)
    assert result.exit_code == 0, result.output
    for story in json.loads(result.stdout):
        titles = [i["title"] for i in story["items"]]
        if any(notice_kind(t) for t in titles):
            assert len(titles) == 1, titles
