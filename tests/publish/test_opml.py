"""``clusterfeed feeds import`` and ``feeds export``: OPML in and out of the operator's config.

The config is the operator's own file: import must add the new partners and leave every
byte that was there before exactly as it was, and a hostile OPML file must neither leak
a local file into the config nor turn into a local feed.
"""

from __future__ import annotations

import tomllib
import uuid
import xml.etree.ElementTree as ET
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from clusterfeed.config import load_config
from clusterfeed.publish.opml import (
    NewFeed,
    Outline,
    append_blocks,
    parse_opml,
    plan_import,
    render_feeds,
    topic_slug,
)
from tests.conftest import EXAMPLE_FEED_META, EXAMPLE_FEEDS, write_config


def opml(body: str, *, version: str = "2.0", doctype: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"{doctype}"
        f'<opml version="{version}">\n'
        "<head><title>Partners of the NordBio Cluster</title></head>\n"
        f"<body>\n{body}\n</body>\n</opml>\n"
    ).encode()


PARTNERS = opml(
    """
  <outline text="Gene Therapy" title="Gene Therapy">
    <outline type="rss" text="Nordlicht Labor" title="Nordlicht Labor"
             xmlUrl="https://nordlicht-labor.example/news/feed.xml"
             htmlUrl="https://nordlicht-labor.example/" language="de"/>
    <outline type="atom" text="Elbe Diagnostics &amp; Co. &lt;Kiel&gt;"
             xmlUrl="https://elbe-diagnostics.example/atom" category="/Diagnostics,Medtech"/>
  </outline>
  <outline text="Kansai MedTech" xmlUrl="https://kansai-medtech.example/rss"
           htmlUrl="javascript:alert(1)"/>
"""
)


def appended_feeds(before: bytes, after: bytes) -> list[dict[str, Any]]:
    """The feeds in the text that an import added after the original bytes."""
    assert after.startswith(before), "the original file must be kept byte for byte"
    added = after[len(before) :].decode("utf-8")
    return list(tomllib.loads(added).get("feeds", []))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- import -----------------------------------------------------------------------------


def test_import_appends_the_new_feeds_and_keeps_every_byte(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    original = example_copy.read_bytes()
    source = write(tmp_path / "partners.opml", PARTNERS)

    result = run_cli("feeds", "import", source, "--config", example_copy)

    assert result.exit_code == 0, result.output
    assert "added 3 feeds, skipped 0 already present" in result.stdout
    assert appended_feeds(original, example_copy.read_bytes()) == [
        {
            "name": "Nordlicht Labor",
            "url": "https://nordlicht-labor.example/news/feed.xml",
            "site": "https://nordlicht-labor.example/",
            "topics": ["gene-therapy"],
            "language": "de",
        },
        {
            "name": "Elbe Diagnostics & Co. <Kiel>",
            "url": "https://elbe-diagnostics.example/atom",
            "topics": ["gene-therapy", "diagnostics", "medtech"],
            "language": "en",
        },
        {
            # A javascript: htmlUrl is no site; the feed is still taken.
            "name": "Kansai MedTech",
            "url": "https://kansai-medtech.example/rss",
            "language": "en",
        },
    ]
    check = run_cli("check", "--config", example_copy)
    assert check.exit_code == 0, check.output
    assert "12 feeds" in check.stdout
    config = load_config(example_copy)
    assert [f.name for f in config.feeds[:9]] == [meta[0] for meta in EXAMPLE_FEED_META]
    assert config.feed("Nordlicht Labor").language == "de"


def test_importing_the_same_file_again_adds_nothing(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    source = write(tmp_path / "partners.opml", PARTNERS)
    run_cli("feeds", "import", source, "--config", example_copy)
    after_first = example_copy.read_bytes()

    again = run_cli("feeds", "import", source, "--config", example_copy)

    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1] == (
        "added 0 feeds, skipped 3 already present "
        "(Nordlicht Labor, Elbe Diagnostics & Co. <Kiel>, Kansai MedTech)"
    )
    assert example_copy.read_bytes() == after_first


def test_the_same_url_written_differently_counts_as_present(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    run_cli("feeds", "import", write(tmp_path / "first.opml", PARTNERS), "--config", example_copy)
    before = example_copy.read_bytes()
    second = opml(
        """
  <outline text="Nordlicht (newsletter link)" type="rss"
      xmlUrl="https://NORDLICHT-Labor.Example/news/feed.xml?utm_source=newsletter&amp;utm_medium=mail"/>
  <outline text="Kansai MedTech" xmlUrl="http://www.kansai-medtech.example:80/rss/"/>
  <outline text="Helix Vektor" xmlUrl="https://helixvektor.example/en/news.rss"/>
  <outline text="Sund Biologics" xmlUrl="https://sund-bio.example/feed"/>
  <outline text="Sund Biologics mirror" xmlUrl="https://sund-bio.example/feed?utm_campaign=x"/>
"""
    )

    result = run_cli(
        "feeds", "import", write(tmp_path / "second.opml", second), "--config", example_copy
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-2] == (
        "added 2 feeds, skipped 3 already present "
        "(Nordlicht (newsletter link), Kansai MedTech, Sund Biologics mirror)"
    )
    assert "Nordlicht (newsletter link): already in the config as 'Nordlicht Labor'" in (
        result.stdout
    )
    added = appended_feeds(before, example_copy.read_bytes())
    # "Helix Vektor" is a local example feed: a new URL under a taken name gets a number.
    assert [(f["name"], f["url"]) for f in added] == [
        ("Helix Vektor (2)", "https://helixvektor.example/en/news.rss"),
        ("Sund Biologics", "https://sund-bio.example/feed"),
    ]
    assert run_cli("check", "--config", example_copy).exit_code == 0


def test_dry_run_shows_the_blocks_and_writes_nothing(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    source = write(tmp_path / "partners.opml", PARTNERS)
    original = example_copy.read_bytes()
    files_before = sorted(p.name for p in example_copy.parent.iterdir())

    result = run_cli("feeds", "import", source, "--config", example_copy, "--dry-run")

    assert result.exit_code == 0, result.output
    assert example_copy.read_bytes() == original
    assert sorted(p.name for p in example_copy.parent.iterdir()) == files_before
    assert 'name = "Nordlicht Labor"' in result.stdout
    assert "[[feeds]]" in result.stdout
    assert "would add 3 feeds, skipped 0 already present" in result.stdout
    assert result.stdout.splitlines()[-1] == f"dry run: {example_copy} unchanged"


def test_outlines_that_are_not_web_feeds_are_reported_not_imported(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    source = write(
        tmp_path / "mixed.opml",
        opml(
            """
  <outline text="Passwords" type="rss" xmlUrl="file:///etc/passwd"/>
  <outline text="Relative" type="rss" xmlUrl="../secrets/feed.xml"/>
  <outline text="Förde Startups" type="link" url="https://foerde-startups.example/news"/>
  <outline text="A podcast" type="include" xmlUrl="https://pod.example/list.opml"/>
  <outline text="Empty folder"/>
""",
            version="1.0",
        ),
    )
    original = example_copy.read_bytes()

    result = run_cli("feeds", "import", source, "--config", example_copy)

    assert result.exit_code == 0, result.output
    assert example_copy.read_bytes() == original
    assert "  - Passwords: not imported, 'file:///etc/passwd' is not an http(s) URL" in (
        result.stdout
    )
    assert "  - Relative: not imported" in result.stdout
    assert '  - Förde Startups: not imported, a link (type "link"), not a feed' in result.stdout
    assert '  - A podcast: not imported, type "include", not a feed' in result.stdout
    assert result.stdout.splitlines()[-1] == (
        "added 0 feeds, skipped 0 already present, ignored 4 outlines that are not feeds"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not well-formed XML"),
        (b"Nordlicht Labor, https://nordlicht-labor.example/feed\n", "not well-formed XML"),
        (b'<opml version="2.0"><head><title>x</title></head>', "not well-formed XML"),
        (b'<opml version="2.0"><head><title>x</title></head></opml>', "no <body> element"),
        (b"<html><body><p>Hello</p></body></html>", "expected <opml>"),
    ],
    ids=["empty", "csv", "truncated", "no-body", "html"],
)
def test_malformed_opml_is_one_clear_line_and_exit_2(
    example_copy: Path, tmp_path: Path, run_cli, content: bytes, reason: str
) -> None:
    source = write(tmp_path / "broken-partners.opml", content)
    original = example_copy.read_bytes()

    result = run_cli("feeds", "import", source, "--config", example_copy)

    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {source}: ")
    assert reason in line
    assert example_copy.read_bytes() == original


def test_a_missing_opml_file_is_named(example_copy: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("feeds", "import", tmp_path / "nowhere.opml", "--config", example_copy)

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'nowhere.opml'}: cannot read the file")


XXE_DOCTYPES = {
    "entity-in-attribute": (
        '<!DOCTYPE opml [<!ENTITY xxe SYSTEM "file://{secret}">]>',
        '<outline text="Leak &xxe;" type="rss" xmlUrl="https://leak.example/feed"/>',
    ),
    "entity-in-text": (
        '<!DOCTYPE opml [<!ENTITY xxe SYSTEM "file://{secret}">]>',
        '<outline text="Leak" type="rss" xmlUrl="https://leak.example/feed">&xxe;</outline>',
    ),
    "parameter-entity": (
        '<!DOCTYPE opml [<!ENTITY % xxe SYSTEM "file://{secret}"> %xxe;]>',
        '<outline text="Leak" type="rss" xmlUrl="https://leak.example/feed"/>',
    ),
}


@pytest.mark.parametrize("case", sorted(XXE_DOCTYPES))
def test_an_external_entity_never_reads_a_local_file(
    example_copy: Path, tmp_path: Path, run_cli, case: str
) -> None:
    marker = f"TOP-SECRET-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.txt"
    secret.write_text(marker, encoding="utf-8")
    doctype, body = XXE_DOCTYPES[case]
    source = write(tmp_path / "xxe.opml", opml(body, doctype=doctype.format(secret=secret)))
    original = example_copy.read_bytes()

    result = run_cli("feeds", "import", source, "--config", example_copy)

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {source}: ")
    assert marker not in result.output
    assert example_copy.read_bytes() == original


def test_an_external_dtd_is_not_loaded(example_copy: Path, tmp_path: Path, run_cli) -> None:
    marker = f"TOP-SECRET-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.dtd"
    secret.write_text(f'<!ENTITY name "{marker}">', encoding="utf-8")
    source = write(
        tmp_path / "dtd.opml",
        opml(
            '<outline text="Nordlicht Labor" xmlUrl="https://nordlicht-labor.example/feed"/>',
            doctype=f'<!DOCTYPE opml SYSTEM "file://{secret}">\n',
        ),
    )

    result = run_cli("feeds", "import", source, "--config", example_copy)

    assert result.exit_code == 0, result.output
    assert marker not in result.output
    assert marker not in example_copy.read_text(encoding="utf-8")
    assert load_config(example_copy).feed("Nordlicht Labor").url == (
        "https://nordlicht-labor.example/feed"
    )


def test_an_import_that_would_break_the_config_writes_nothing(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    source = write(tmp_path / "partners.opml", PARTNERS)
    original = example_copy.read_bytes()
    files_before = sorted(p.name for p in example_copy.parent.iterdir())

    result = run_cli("feeds", "import", source, "--config", example_copy, "--language", "German")

    assert result.exit_code == 2
    assert example_copy.read_bytes() == original
    assert sorted(p.name for p in example_copy.parent.iterdir()) == files_before
    lines = result.stderr.splitlines()
    # Nordlicht Labor has language="de" in the OPML; the other two take the option.
    assert len(lines) == 3
    assert lines[0].startswith(
        f'error: {example_copy}: feeds "Elbe Diagnostics & Co. <Kiel>" (entry 11), language: '
        'found "German"'
    )
    assert "'Elbe Diagnostics & Co. <Kiel>' from the OPML file" in lines[0]
    assert lines[-1] == "nothing written: 2 problems in the config."


def test_feeds_written_as_an_inline_array_are_not_rewritten(tmp_path: Path, run_cli) -> None:
    config = write_config(tmp_path, [])
    text = (
        'feeds = [{ name = "Helix Vektor", url = "https://helixvektor.example/news.rss" }]\n'
        + config.read_text(encoding="utf-8")
    )
    config.write_text(text, encoding="utf-8")
    source = write(tmp_path / "partners.opml", PARTNERS)

    result = run_cli("feeds", "import", source, "--config", config)

    assert result.exit_code == 2
    assert "inline array" in result.stderr
    assert config.read_text(encoding="utf-8") == text


# -- export ---------------------------------------------------------------------------------


LISTING_PAGE = """
[[feeds]]
name = "Förde Startups"
url = "https://foerde-startups.example/news"
kind = "html"
site = "https://foerde-startups.example/"
topics = ["startups"]
language = "de"

[feeds.selectors]
item = "li.news"
title = "h3"
"""

REMOTE_FEEDS = [
    {
        "name": 'Elbe Diagnostics & "Co." <Kiel>',
        "url": "https://elbe-diagnostics.example/atom?lang=en&format=full",
        "site": "https://elbe-diagnostics.example/",
        "topics": ["diagnostics", "medtech"],
        "language": "en",
    },
    {
        "name": "Kansai MedTech",
        "url": "https://kansai-medtech.example/rss",
        "language": "ja",
    },
    {
        "name": "Sund Biologics (paused)",
        "url": "https://sund-bio.example/feed",
        "topics": ["research"],
        "language": "da",
        "enabled": False,
    },
]


@pytest.fixture
def remote_config(tmp_path: Path) -> Path:
    """Three remote feeds, one partner news page without a feed, and one local file."""
    local = {"name": "Helix Vektor", "url": str(EXAMPLE_FEEDS / "helix-vektor.rss")}
    folder = tmp_path / "remote"
    folder.mkdir()
    return write_config(folder, [*REMOTE_FEEDS, local], extra=LISTING_PAGE)


def outlines_of(data: bytes) -> list[dict[str, str]]:
    root = ET.fromstring(data)  # the standard library's parser, not lxml or feedparser
    return [dict(o.attrib) for o in root.iter("outline")]


def test_export_writes_opml_2_with_one_outline_per_remote_feed(
    remote_config: Path, run_cli
) -> None:
    result = run_cli("feeds", "export", "--config", remote_config)

    assert result.exit_code == 0, result.output
    data = result.stdout_bytes
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = ET.fromstring(data)
    assert (root.tag, root.get("version")) == ("opml", "2.0")
    assert root.findtext("head/title") == "NordBio Cluster partner feeds"
    created = parsedate_to_datetime(root.findtext("head/dateCreated") or "")
    assert created.tzinfo is not None
    assert outlines_of(data) == [
        {
            "type": "rss",
            "text": 'Elbe Diagnostics & "Co." <Kiel>',
            "title": 'Elbe Diagnostics & "Co." <Kiel>',
            "xmlUrl": "https://elbe-diagnostics.example/atom?lang=en&format=full",
            "htmlUrl": "https://elbe-diagnostics.example/",
            "language": "en",
            "category": "diagnostics,medtech",
        },
        {
            "type": "rss",
            "text": "Kansai MedTech",
            "title": "Kansai MedTech",
            "xmlUrl": "https://kansai-medtech.example/rss",
            "language": "ja",
        },
        {
            "type": "rss",
            "text": "Sund Biologics (paused)",
            "title": "Sund Biologics (paused)",
            "xmlUrl": "https://sund-bio.example/feed",
            "language": "da",
            "category": "research",
            "isComment": "true",
        },
        {
            "type": "link",
            "text": "Förde Startups",
            "title": "Förde Startups",
            "url": "https://foerde-startups.example/news",
            "htmlUrl": "https://foerde-startups.example/",
            "language": "de",
            "category": "startups",
        },
    ]
    assert "note: skipped 'Helix Vektor': a local file" in result.stderr
    assert "'Förde Startups' is a news page without a feed" in result.stderr


def test_export_to_a_file(remote_config: Path, tmp_path: Path, run_cli) -> None:
    target = tmp_path / "out" / "partners.opml"

    result = run_cli("feeds", "export", "--config", remote_config, "--out", target)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {target}: 4 feeds\n"
    assert len(outlines_of(target.read_bytes())) == 4


def test_export_of_the_example_config_shares_only_urls(
    example_copy: Path, tmp_path: Path, run_cli
) -> None:
    # The bundled example reads local files only: they are left out, one note each.
    bare = run_cli("feeds", "export", "--config", example_copy)
    assert bare.exit_code == 0, bare.output
    assert outlines_of(bare.stdout_bytes) == []
    assert bare.stderr.count("note: skipped") == 9

    run_cli("feeds", "import", write(tmp_path / "p.opml", PARTNERS), "--config", example_copy)
    result = run_cli("feeds", "export", "--config", example_copy)

    assert [o["xmlUrl"] for o in outlines_of(result.stdout_bytes)] == [
        "https://nordlicht-labor.example/news/feed.xml",
        "https://elbe-diagnostics.example/atom",
        "https://kansai-medtech.example/rss",
    ]


def test_round_trip_export_then_import_gives_the_same_remote_feeds(
    remote_config: Path, tmp_path: Path, run_cli
) -> None:
    exported = run_cli("feeds", "export", "--config", remote_config, "--out", tmp_path / "x.opml")
    assert exported.exit_code == 0, exported.output
    empty = tmp_path / "empty"
    empty.mkdir()
    target = write_config(empty, [])  # no feeds yet: only valid once the import adds some

    result = run_cli("feeds", "import", tmp_path / "x.opml", "--config", target)

    assert result.exit_code == 0, result.output
    assert "added 3 feeds" in result.stdout
    assert '  - Förde Startups: not imported, a link (type "link"), not a feed' in result.stdout

    def remote(path: Path) -> list[tuple[Any, ...]]:
        return [
            (f.name, f.url, f.site, f.topics, f.language, f.enabled)
            for f in load_config(path).feeds
            if f.is_remote and f.kind == "feed"
        ]

    assert remote(target) == remote(remote_config)


# -- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "topic"),
    [
        ("Gene Therapy", "gene-therapy"),
        ("  Drug Discovery & Development ", "drug-discovery-development"),
        ("Förderung", "forderung"),
        ("MedTech_Devices", "medtech_devices"),
        ("-- News --", "news"),
        ("研究", None),
        ("", None),
    ],
)
def test_folder_names_become_config_topics(text: str, topic: str | None) -> None:
    assert topic_slug(text) == topic


def test_nested_folders_and_categories_are_topics() -> None:
    document = parse_opml(
        opml(
            """
  <outline text="Research">
    <outline title="Cell &amp; Gene Therapy">
      <outline text="Nordlicht Labor" xmlUrl="https://nordlicht.example/feed"
               category="/Biotech/Startups, cell-&amp;-gene-therapy" language="DE"/>
    </outline>
  </outline>
"""
        ),
        "partners.opml",
    )

    assert document.outlines == [
        Outline(
            title="Nordlicht Labor",
            xml_url="https://nordlicht.example/feed",
            topics=("research", "cell-gene-therapy", "biotech", "startups"),
            language="de",
        )
    ]


def test_a_taken_name_gets_a_number() -> None:
    existing = [
        {"name": "Nordlicht Labor", "url": "https://nordlicht.example/feed"},
        {"name": "Nordlicht Labor (2)", "url": "https://nordlicht.example/de/feed"},
    ]
    outlines = [Outline("nordlicht labor", "https://nordlicht.example/jp/feed")]

    plan = plan_import(existing, outlines, "en")

    assert [f.name for f in plan.added] == ["nordlicht labor (3)"]


@pytest.mark.parametrize(
    "original",
    [
        '[cluster]\nname = "x"\n',
        '[cluster]\nname = "x"',
        '[cluster]\nname = "x"\n\n',
        '[cluster]\r\nname = "x"\r\n',
        "",
    ],
    ids=["newline", "no-final-newline", "blank-line", "crlf", "empty"],
)
def test_blocks_are_appended_after_the_original_text(original: str) -> None:
    feeds = [
        NewFeed("A & B", "https://a.example/feed", None, ("x",), "en"),
        NewFeed('Say "hi"', "https://b.example/feed", "https://b.example/", (), "de"),
    ]

    text = append_blocks(original, render_feeds(feeds))

    assert text.startswith(original)
    assert "\n\n\n" not in text.replace("\r\n", "\n")
    assert tomllib.loads(text)["feeds"] == [f.as_table() for f in feeds]
