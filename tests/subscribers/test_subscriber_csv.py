"""Subscriber lists as spreadsheet programs write them, through `subscribers import`.

Real files in each encoding and layout (Excel's "Unicode text": UTF-16LE with a BOM and
TABs; "CSV" on Windows: Windows-1252; German Excel: UTF-8 with a BOM and semicolons; an
old Mac export: MacRoman), imported by the real command into a real store. Whatever
cannot be read, or names a topic or language no feed offers, stops the import with a
sentence naming the file and line, and nothing is imported.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import pytest

from clusterfeed.config import load_config
from clusterfeed.store import Store


def _members(config: Path) -> dict[str, Any]:
    store = Store(load_config(config).database_url)
    store.migrate()
    try:
        return {m.subscriber.email: m.subscriber for m in store.memberships()}
    finally:
        store.close()


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


SPREADSHEETS = [
    pytest.param(
        "unicode-text.txt",
        codecs.BOM_UTF16_LE
        + "email\tname\ttopics\tlanguages\r\n"
        "joerg@example.org\tJörg Müller\tresearch\tde\r\n"
        "aiko@example.org\t山田 愛子\tinternational\tja\r\n".encode("utf-16-le"),
        None,
        {"joerg@example.org": "Jörg Müller", "aiko@example.org": "山田 愛子"},
        id="excel-unicode-text-utf16le-bom-tabs",
    ),
    pytest.param(
        "windows.csv",
        "email,name,topics\r\n"
        "joerg@example.org,Jörg Müller,research\r\n"
        "aiko@example.org,Renée Ångström,medtech\r\n".encode("cp1252"),
        None,
        {"joerg@example.org": "Jörg Müller", "aiko@example.org": "Renée Ångström"},
        id="excel-windows-cp1252",
    ),
    pytest.param(
        "german.csv",
        codecs.BOM_UTF8
        + b"email;Name;Topics;Languages\r\n"
        + "joerg@example.org;Jörg Müller;research,medtech;de\r\n"
        'aiko@example.org;"Weiß, Aiko";"financing;research";DE;\r\n'.encode(),
        None,
        {"joerg@example.org": "Jörg Müller", "aiko@example.org": "Weiß, Aiko"},
        id="german-excel-utf8-bom-semicolons",
    ),
    pytest.param(
        "mac.csv",
        "email,name\r\njoerg@example.org,Jörg Müller\r\naiko@example.org,Zoë Çelik\r\n".encode(
            "mac_roman"
        ),
        "mac_roman",
        {"joerg@example.org": "Jörg Müller", "aiko@example.org": "Zoë Çelik"},
        id="macroman-with-encoding-option",
    ),
    pytest.param(
        "utf16-no-bom.csv",
        "email,name\njoerg@example.org,Jörg Müller\naiko@example.org,Ærø\n".encode("utf-16-le"),
        None,
        {"joerg@example.org": "Jörg Müller", "aiko@example.org": "Ærø"},
        id="utf16le-without-bom",
    ),
]


@pytest.mark.parametrize(("name", "data", "encoding", "names"), SPREADSHEETS)
def test_spreadsheet_exports_import_with_their_names_intact(
    example_config: Path,
    tmp_path: Path,
    run_cli: Any,
    name: str,
    data: bytes,
    encoding: str | None,
    names: dict[str, str],
) -> None:
    listing = _write(tmp_path, name, data)
    option = ["--encoding", encoding] if encoding else []

    result = run_cli("subscribers", "import", listing, "--confirmed", *option, "--config",
                     example_config)  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "imported 2" in result.stdout
    members = _members(example_config)
    assert {email: members[email].name for email in names} == names
    if name == "german.csv":
        assert set(members["joerg@example.org"].topics) == {"medtech", "research"}
        assert members["aiko@example.org"].languages == ("de",)
    if name == "windows.csv":
        assert "Windows-1252" in result.stderr  # the operator is told what was assumed


def test_a_file_in_no_known_encoding_stops_with_file_and_line(
    example_config: Path, tmp_path: Path, run_cli: Any
) -> None:
    # 0x81 is neither UTF-8 here nor a character of Windows-1252.
    listing = _write(
        tmp_path, "odd.csv", b"email,name\r\na@example.org,A\r\nb@example.org,B\x81\r\n"
    )

    result = run_cli("subscribers", "import", listing, "--config", example_config)

    assert result.exit_code == 2
    assert f"{listing}: line 3: byte 0x81" in result.stderr
    assert "--encoding" in result.stderr
    assert "Traceback" not in result.output
    assert "a@example.org" not in _members(example_config)


def test_a_wrong_encoding_option_stops_with_file_and_line(
    example_config: Path, tmp_path: Path, run_cli: Any
) -> None:
    listing = _write(
        tmp_path, "latin.csv", "email,name\na@example.org,Ann\nb@example.org,Bärbel\n".encode(
            "latin-1")
    )  # fmt: skip

    wrong = run_cli("subscribers", "import", listing, "--encoding", "utf-8", "--config",
                    example_config)  # fmt: skip
    assert wrong.exit_code == 2
    assert f"{listing}: line 3: byte 0xe4 cannot be read as UTF-8" in wrong.stderr
    unknown = run_cli("subscribers", "import", listing, "--encoding", "klingon", "--config",
                      example_config)  # fmt: skip
    assert unknown.exit_code == 2
    assert "unknown encoding 'klingon'" in unknown.stderr
    assert "b@example.org" not in _members(example_config)

    right = run_cli("subscribers", "import", listing, "--encoding", "latin-1", "--config",
                    example_config)  # fmt: skip
    assert right.exit_code == 0, right.output
    assert _members(example_config)["b@example.org"].name == "Bärbel"


def test_unknown_topics_and_languages_are_reported_per_line_not_stored(
    example_config: Path, tmp_path: Path, run_cli: Any
) -> None:
    listing = _write(
        tmp_path,
        "list.csv",
        b"email,topics,languages\n"
        b"ok@example.org,research,de\n"
        b"typo@example.org,gene-therapie;research,en\n"
        b"lang@example.org,,fr;de\n",
    )

    result = run_cli("subscribers", "import", listing, "--config", example_config)

    assert result.exit_code == 2
    assert f"{listing}: line 3, column topics: not offered: gene-therapie" in result.stderr
    assert "gene-therapy" in result.stderr  # what is offered instead
    assert f"{listing}: line 4, column languages: not offered: fr; the feeds offer de, en, ja" in (
        result.stderr
    )
    assert "nothing imported" in result.stderr
    assert "ok@example.org" not in _members(example_config)


def test_add_refuses_topics_and_languages_no_feed_offers(
    example_config: Path, run_cli: Any
) -> None:
    result = run_cli("subscribers", "add", "typo@example.org", "--topic", "gene-therapie",
                     "--language", "fr", "--confirmed", "--config", example_config)  # fmt: skip

    assert result.exit_code == 2
    assert "--topic: not offered: gene-therapie; the feeds offer" in result.stderr
    assert "--language: not offered: fr; the feeds offer de, en, ja" in result.stderr
    assert "typo@example.org" not in _members(example_config)

    ok = run_cli("subscribers", "add", "ok@example.org", "--topic", "Gene-Therapy",
                 "--language", "DE", "--confirmed", "--config", example_config)  # fmt: skip
    assert ok.exit_code == 0, ok.output
    added = _members(example_config)["ok@example.org"]
    assert (added.topics, added.languages) == (("gene-therapy",), ("de",))
