"""What a subscriber sees: the digest rendered by a real browser (issue 4, point 7).

Headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) lays out the HTML
part of a digest the example sends, at a phone's width and a reading pane's, through
the same functions ``scripts/screenshots`` uses for the pictures in docs/.
"""

from __future__ import annotations

import email
import email.policy
import importlib.machinery
import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
    reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)",
)


def _screenshots() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(
        "screenshots", str(REPO / "scripts" / "screenshots")
    )
    spec = importlib.util.spec_from_loader("screenshots", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sent_digest(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, Path]:
    shots = _screenshots()
    workdir = tmp_path_factory.mktemp("example")
    shots.run_example(workdir)
    mails = sorted((workdir / "var" / "mail" / "new").iterdir())
    assert mails, "the example sent no digest"
    return shots, workdir, mails[0]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("width", [375, 600])
def test_the_digest_fits_the_screen_without_sideways_scrolling(
    sent_digest: tuple[Any, Path, Path], width: int
) -> None:
    shots, workdir, eml = sent_digest
    page = shots.digest_html(eml, workdir)
    profile = workdir / f"profile-{width}"
    size = shots.measure(page.as_uri(), width, profile)
    assert size["width"] <= width, f"the digest is {size['width']} px wide in a {width} px window"
    assert size["height"] > 600  # the stories are laid out, not an empty page
    out = shots.shoot(
        page.as_uri(), workdir / f"digest-{width}.png", width, size["height"], profile
    )
    assert _png_size(out) == (width, min(max(size["height"], 300), 8000))


def test_every_picture_has_alt_text_and_the_text_part_stands_alone(
    sent_digest: tuple[Any, Path, Path],
) -> None:
    _, _, eml = sent_digest
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    html = message.get_body(preferencelist=("html",)).get_content()  # type: ignore[attr-defined]
    images = re.findall(r"<img\b[^>]*>", html, flags=re.I)
    assert images, "the example digest has pictures"
    for tag in images:
        alt = re.search(r'\balt="([^"]*)"', tag)
        assert alt and alt.group(1).strip(), f"no alt text: {tag[:120]}"
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[attr-defined]
    assert "<" not in re.sub(r"<https?://[^>\s]+>", "", text), "markup in the plain-text part"
    assert "unsubscribe" in text.lower()
    assert re.search(r"https?://\S+/unsubscribe/\S+", text)
