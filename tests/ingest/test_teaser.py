"""Teasers are the article's text: no captions, picture credits or links to subscribe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clusterfeed.ingest.teaser import teaser_text


@pytest.mark.parametrize(
    ("fragment", "teaser"),
    [
        # A picture with its caption and credit above the text.
        (
            '<p><img src="https://p.example/a.jpg" alt="Lab"><br><small>The new room '
            "(Picture: Partner)</small></p><p>After eighteen months the site is open.</p>",
            "After eighteen months the site is open.",
        ),
        (
            '<figure><img src="https://p.example/a.jpg" alt=""><figcaption>Das Team bei der '
            "Eröffnung</figcaption></figure><p>Die Klinik eröffnet ein Zentrum.</p>",
            "Die Klinik eröffnet ein Zentrum.",
        ),
        # Links to read, subscribe or share, in any words and with any separators.
        (
            "<p>Themen dieser Ausgabe: Kobe und Kiel.</p><p>"
            '<a href="/n.html">Im Browser lesen</a> | <a href="/abo">Abonnieren</a></p>',
            "Themen dieser Ausgabe: Kobe und Kiel.",
        ),
        (
            "<p>The award goes to Pulsreif.</p><ul><li><a href='https://x.example/s'>Share "
            "on X</a></li><li><a href='https://l.example/s'>LinkedIn</a></li></ul>",
            "The award goes to Pulsreif.",
        ),
        # A credit inside a sentence; the sentence stays.
        ("<p>Kiel (Foto: UKF/Meier) – Die Klinik eröffnet.</p>", "Kiel – Die Klinik eröffnet."),
        # Article text that is a link, or has a picture in it, is text.
        (
            '<p><a href="/x">Helix Vektor opens a vector plant in Kiel with 120 new jobs '
            "for the region</a></p>",
            "Helix Vektor opens a vector plant in Kiel with 120 new jobs for the region",
        ),
        (
            '<p><img src="https://p.example/a.jpg" alt="">' + "Long text. " * 30 + "</p>",
            ("Long text. " * 30).strip(),
        ),
        ("<p>See <a href='/r'>the report</a> (PDF).</p>", "See the report (PDF)."),
        # Only furniture: no teaser from it.
        ('<p><a href="/abo">Newsletter abonnieren</a></p>', ""),
        ("", ""),
    ],
)
def test_a_teaser_is_the_article_text(fragment: str, teaser: str) -> None:
    assert teaser_text(fragment) == teaser


def test_the_example_teasers_have_no_page_furniture(example_config: Path, run_cli) -> None:
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    assert run_cli("publish", "--config", example_config).exit_code == 0
    public = example_config.parent / "public"

    items = json.loads((public / "feed.json").read_text(encoding="utf-8"))["items"]
    by_title = {i["title"]: i.get("summary") or "" for i in items}
    newsletter = by_title["NordBio Newsletter 11/2026"]
    assert newsletter.startswith("Themen dieser Ausgabe")
    assert "abonnieren" not in newsletter and "im Browser lesen" not in newsletter
    lab = next(s for t, s in by_title.items() if t.startswith("KristallWerk opens new"))
    assert lab.startswith("After eighteen months of construction")
    page = (public / "index.html").read_text(encoding="utf-8")
    teasers = re.findall(r'<p class="teaser">(.*?)</p>', page, flags=re.S)
    assert teasers
    for teaser in teasers:
        assert "(Picture:" not in teaser and "Newsletter abonnieren" not in teaser
