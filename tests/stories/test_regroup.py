"""Regrouping stories when items arrive late, without changing what readers saw.

A partner's version of an event that is published before items already stored (a late
feed, a backlog) makes the recent window be grouped again (``clusterfeed.stories.cluster.regroup``).
A story readers or subscribers already have keeps its id (its Atom id), and a
subscriber is never mailed one event twice because its story was regrouped: checked
here with real commands, a real feed server and real mail.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from clusterfeed.stories.cluster import Placed, region_start, regroup
from clusterfeed.stories.features import Evidence, ItemFeatures
from clusterfeed.stories.score import default_model
from tests.conftest import FeedServer, Route, digest_titles, write_config
from tests.digest.test_digest_cap import Outbox, _run

T0 = datetime(2026, 11, 16, 9, tzinfo=UTC)
READER = "reader@example.org"


def _evidence() -> Evidence:
    empty: frozenset[Any] = frozenset()
    return Evidence(empty, empty, empty, empty, empty, empty, empty, empty, None, None, ())


def _item(feed: str, language: str, hours: float, event: int) -> ItemFeatures:
    """An item whose embedding says which of a few events it tells."""
    vector = np.zeros(512, dtype=np.float32)
    vector[event] = 1.0
    published = T0 + timedelta(hours=hours)
    return ItemFeatures(feed, language, published, vector, _evidence())


def test_a_late_version_regroups_and_the_story_subscribers_had_survives() -> None:
    """Two stories of one event exist (the matcher kept them apart when they came);
    a third version, published before both, arrives: all three are one story now, and
    the one a subscriber was sent keeps its id though the other is older."""
    feats = {
        "late": _item("Partner C", "ja", 0, event=1),
        "older": _item("Partner A", "en", 2, event=1),
        "sent": _item("Partner B", "de", 3, event=1),
        "other": _item("Partner D", "en", 4, event=2),
    }
    placed = {
        "late": Placed(story=40, page=None, new=True),
        "older": Placed(story=10, page=None, new=False),
        "sent": Placed(story=20, page=None, new=False),
        "other": Placed(story=30, page=None, new=False),
    }
    model = default_model()
    assert region_start(placed, feats, model.window_days) is not None
    plan = regroup(feats, placed, model, sent=[20])
    assert plan.story_of["late"] == plan.story_of["older"] == plan.story_of["sent"] == 20
    assert plan.absorbed == {10: 20, 40: 20}
    assert plan.story_of.get("other", 30) == 30  # another event: untouched
    assert plan.why["late"] is None  # the earliest version heads the story
    assert plan.why["sent"] and plan.why["sent"].startswith("score")
    # The same stored items give the same plan, whatever order the mapping has.
    shuffled = dict(reversed(list(placed.items())))
    assert regroup(feats, shuffled, model, sent=[20]) == plan


def test_new_items_after_everything_stored_regroup_nothing() -> None:
    feats = {"a": _item("A", "en", 0, event=1), "b": _item("B", "de", 5, event=1)}
    placed = {"a": Placed(10, None, False), "b": Placed(11, None, True)}
    model = default_model()
    assert region_start(placed, feats, model.window_days) is None
    plan = regroup(feats, placed, model)
    assert plan.story_of == {"b": 10} and plan.absorbed == {11: 10}


def _release(day: int, german: bool) -> dict[str, str]:
    """One event told by its English source and, later found, a German partner."""
    link = "https://www.helixvektor.example/news/aav-plant-bahrenfeld"
    if german:
        return {
            "title": "Helix Vektor eröffnet AAV-Vektorwerk in Hamburg-Bahrenfeld",
            "link": "https://www.nordbio.example/de/aktuelles/helix-vektor-werk",
            "description": (
                "<p>Helix Vektor hat in Hamburg-Bahrenfeld ein Werk für AAV-Vektoren "
                "eröffnet. Die Investition beträgt 40 Mio. Euro, 120 Arbeitsplätze "
                f'entstehen. <a href="{link}">Zur Mitteilung</a></p>'
            ),
            "date": f"Mon, {day} Nov 2026 08:00:00 +0000",
        }
    return {
        "title": "Helix Vektor opens AAV vector plant in Hamburg-Bahrenfeld",
        "link": link,
        "description": (
            "<p>Helix Vektor has opened a plant for AAV vectors in Hamburg-Bahrenfeld. "
            "The investment is EUR 40 million and creates 120 jobs.</p>"
        ),
        "date": f"Tue, {day} Nov 2026 10:00:00 +0000",
    }


def test_a_late_partner_version_neither_changes_the_story_id_nor_mails_it_again(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    smtp_server: Any,
    run_cli: Any,
    rss_feed: Any,
) -> None:
    outbox = Outbox("smtp", tmp_path, smtp_server)
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", [_release(17, False)]))
    feed_server.routes["/nordbio.rss"] = Route(rss_feed("NordBio Cluster (Deutsch)", []))
    feeds = [
        {"name": "Helix Vektor", "url": feed_server.url("/helix.rss"), "language": "en"},
        {
            "name": "NordBio Cluster (Deutsch)",
            "url": feed_server.url("/nordbio.rss"),
            "language": "de",
        },
    ]
    config = write_config(
        tmp_path,
        feeds,
        database_url=database_url,
        mail=outbox.mail,
        subscribers=[{"email": READER, "languages": ["en", "de"]}],
    )
    _run(run_cli, "fetch", "--config", config)
    _run(run_cli, "digest", "--config", config)
    (first,) = outbox.to(READER)
    assert digest_titles(first) == {_release(17, False)["title"]}
    before = json.loads(_run(run_cli, "stories", "--json", "--config", config))

    # The partner's German version, published a day *before* the stored English one,
    # turns up only now: the window is grouped again and both are one story.
    feed_server.routes["/nordbio.rss"] = Route(
        rss_feed("NordBio Cluster (Deutsch)", [_release(16, True)])
    )
    _run(run_cli, "fetch", "--config", config)
    after = json.loads(_run(run_cli, "stories", "--json", "--config", config))
    assert len(before) == len(after) == 1, after
    assert _ids(after) == _ids(before)  # the story readers saw keeps its id

    # The next digest does not bring the event again.
    again = _run(run_cli, "digest", "--config", config)
    assert re.search(r"digest: 0 planned", again), again
    assert len(outbox.to(READER)) == 1


def _ids(listing: Any) -> list[object]:
    stories = listing["stories"] if isinstance(listing, dict) else listing
    return [s.get("id") or s.get("key") for s in stories]


GERMAN_ONLY = "deutsch@example.org"


def _news(link: str, title: str, text: str, day: int) -> dict[str, str]:
    return {
        "title": title,
        "link": link,
        "description": f"<p>{text}</p>",
        "date": f"Mon, {day} Nov 2026 08:00:00 +0000",
    }


def test_a_regroup_that_absorbs_a_story_a_subscriber_had_does_not_mail_it_again(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    smtp_server: Any,
    run_cli: Any,
    rss_feed: Any,
) -> None:
    """A German reader had only the German story; the English one (sent to another
    reader) is older. When the operator says both are one (``together``) and a late
    item makes the window be grouped again, the English story survives and takes the
    German one in: the German reader counts as having it and gets no second mail."""
    outbox = Outbox("smtp", tmp_path, smtp_server)
    english = _news(
        "https://www.helixvektor.example/news/capside",
        "Helix Vektor joins EU consortium CAPSIDE-EU",
        "Helix Vektor is one of eleven partners of the EU project on capsid engineering.",
        17,
    )
    german = _news(
        "https://www.uk-foerde.example/aktuell/capside-eu",
        "Förde-Klinikum koordiniert Forschungsverbund",
        "Das Klinikum leitet ein Vorhaben mit elf Partnern aus acht Ländern.",
        18,
    )
    late = _news(
        "https://www.uk-foerde.example/aktuell/sommerfest",
        "Sommerfest auf dem Campus",
        "Das Klinikum lädt Beschäftigte und Familien zum Sommerfest ein.",
        16,
    )
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", [english]))
    feed_server.routes["/foerde.rss"] = Route(rss_feed("UK Förde", [german]))
    feeds = [
        {"name": "Helix Vektor", "url": feed_server.url("/helix.rss"), "language": "en"},
        {"name": "UK Förde", "url": feed_server.url("/foerde.rss"), "language": "de"},
    ]
    subscribers = [
        {"email": READER, "languages": ["en"]},
        {"email": GERMAN_ONLY, "languages": ["de"]},
    ]
    config = write_config(
        tmp_path, feeds, database_url=database_url, mail=outbox.mail, subscribers=subscribers
    )
    _run(run_cli, "fetch", "--config", config)
    _run(run_cli, "digest", "--config", config)
    assert [digest_titles(m) for m in outbox.to(READER)] == [{english["title"]}]
    assert [digest_titles(m) for m in outbox.to(GERMAN_ONLY)] == [{german["title"]}]
    before = json.loads(_run(run_cli, "stories", "--json", "--config", config))
    assert len(before) == 2

    pair = f'\n[stories]\ntogether = [["{english["link"]}", "{german["link"]}"]]\n'
    config.write_text(config.read_text("utf-8") + pair, "utf-8")
    feed_server.routes["/foerde.rss"] = Route(rss_feed("UK Förde", [german, late]))
    _run(run_cli, "fetch", "--config", config)
    after = json.loads(_run(run_cli, "stories", "--json", "--config", config))
    joined = [s for s in after if len(s["items"]) == 2]
    assert len(joined) == 1, after
    survivor = next(s for s in before if s["items"][0]["link"] == english["link"])
    assert joined[0]["id"] == survivor["id"]  # the older story readers saw keeps its id

    _run(run_cli, "digest", "--config", config)
    assert len(outbox.to(READER)) == 1  # nothing new in English
    # The German reader gets the summer party, never the joined story again.
    german_mails = outbox.to(GERMAN_ONLY)
    assert [digest_titles(m) for m in german_mails[1:]] in ([], [{late["title"]}])
    assert all(english["title"] not in digest_titles(m) for m in german_mails)
    assert all(german["title"] not in digest_titles(m) for m in german_mails[1:])
