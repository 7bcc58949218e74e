"""A CSV file as a spreadsheet program writes it: which encoding, which delimiter.

Subscriber lists come from Excel, LibreOffice and Numbers, and each writes "CSV" its own
way: UTF-8 with or without a byte order mark, UTF-16 with a BOM and TABs ("Unicode
text"), the Windows code page 1252 ("CSV" on a Windows machine), semicolons instead of
commas where the comma is the decimal sign (German, French locales).

The encoding is decided by a fixed rule, not a statistical guess: a BOM says it for
certain; otherwise text that decodes as UTF-8 is UTF-8 (bytes of Windows-1252 text with
accented letters almost never form valid UTF-8); otherwise it is read as Windows-1252,
and the operator is told so. A detector such as charset-normalizer would have to guess
from a few accented names among mostly ASCII addresses, where its answer (cp1250?
cp1257? MacRoman?) is a coin toss that may change with its version; a rule gives the
same answer every time, and ``--encoding`` covers the rest (e.g. ``mac_roman`` for an
old Mac export). Bytes that fit no rule stop the import with the file and line.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DELIMITERS = (",", ";", "\t")
FALLBACK = "cp1252"
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose BOM it starts with
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_NAMES = {"utf-8-sig": "UTF-8 (with BOM)", "utf-16": "UTF-16", "utf-32": "UTF-32",
          "utf-8": "UTF-8", "cp1252": "Windows-1252"}  # fmt: skip


class CsvTextError(ValueError):
    """The file cannot be read as text; ``line`` is where (1-based) or None."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class CsvText:
    text: str
    encoding: str  # the codec that read it
    guessed: bool  # True when read by the fallback (no BOM, not UTF-8)

    @property
    def encoding_name(self) -> str:
        return _NAMES.get(self.encoding, self.encoding)


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 written without a BOM shows as a NUL in every other byte of ASCII text."""
    sample = data[:4096]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    pairs = len(sample) // 2
    odd = sum(1 for i in range(1, 2 * pairs, 2) if sample[i] == 0)
    even = sum(1 for i in range(0, 2 * pairs, 2) if sample[i] == 0)
    if odd > pairs * 0.6 and even == 0:
        return "utf-16-le"
    if even > pairs * 0.6 and odd == 0:
        return "utf-16-be"
    return None


def _line_of(data: bytes, position: int, encoding: str) -> int:
    return data[:position].decode(encoding, errors="replace").count("\n") + 1


def decode(data: bytes, encoding: str | None = None) -> CsvText:
    """The file's text by the rule above, or ``encoding`` when the operator names one."""
    if encoding is not None:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise CsvTextError(
                f"unknown encoding {encoding!r}; use e.g. utf-8, cp1252 (Windows), "
                "utf-16 (Excel's Unicode text), mac_roman or latin-1"
            ) from None
        if codec == "utf-8" and data.startswith(codecs.BOM_UTF8):
            codec = "utf-8-sig"
        candidates = [codec]
    else:
        bom = next((name for mark, name in _BOMS if data.startswith(mark)), None)
        bare16 = None if bom else _utf16_without_bom(data)
        candidates = [bom] if bom else [bare16] if bare16 else ["utf-8", FALLBACK]
    for codec in candidates:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError as exc:
            if codec != candidates[-1]:
                continue
            byte = data[exc.start : exc.start + 1].hex()
            hint = (
                "it is not in that encoding; name the right one with --encoding"
                if encoding is not None
                else "the file is neither UTF-8 nor Windows-1252: save it as CSV UTF-8 from "
                "the spreadsheet, or name its encoding with --encoding (e.g. mac_roman)"
            )
            raise CsvTextError(
                f"byte 0x{byte} cannot be read as {_NAMES.get(codec, codec)}; {hint}",
                _line_of(data, exc.start, codec),
            ) from None
        if "\x00" in text:
            raise CsvTextError(
                "the file holds NUL characters: it is not a text file (or it is UTF-16 "
                "without a byte order mark; name the encoding with --encoding utf-16-le)",
                text[: text.index("\x00")].count("\n") + 1,
            )
        guessed = encoding is None and codec == FALLBACK
        return CsvText(text.removeprefix("\ufeff"), codec, guessed)
    raise AssertionError("no candidate encodings")  # pragma: no cover


def delimiter(text: str, wanted: str = "email") -> str:
    """The delimiter of the header row: the one that makes a ``wanted`` column, else the
    most frequent of comma, semicolon and TAB (so a header that lacks the column still
    gets its complaint about that, not about the delimiter)."""
    first = text.split("\n", 1)[0]
    for candidate in DELIMITERS:
        row = next(csv.reader([first], delimiter=candidate), [])
        if wanted in (c.strip().lower() for c in row):
            return candidate
    return max(DELIMITERS, key=first.count)


def not_offered(
    row: Mapping[str, Any], offered: tuple[Collection[str], Collection[str]]
) -> list[tuple[str, str]]:
    """(column, message) for each of a row's topics and languages that nobody offers."""
    found = []
    for key, allowed in zip(("topics", "languages"), offered, strict=True):
        unknown = [v for v in row.get(key, ()) if v not in allowed]
        if unknown:
            choices = ", ".join(sorted(allowed)) or "none (no feed has any)"
            found.append((key, f"not offered: {', '.join(unknown)}; the feeds offer {choices}"))
    return found


def read(path: Path, encoding: str | None = None) -> CsvText:
    """Read and decode ``path`` (OSError for a file that cannot be read)."""
    return decode(path.read_bytes(), encoding)
