"""The documentation: the config reference is generated from the model, links resolve.

docs/configuration.md must be exactly what ``python -m clusterfeed.docgen`` writes from
the config model, so a key added, renamed or re-defaulted in config.py cannot leave the
page behind. The README stays short and points into docs/; every relative link and
anchor in them must lead somewhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfeed import docgen
from clusterfeed.config import Config, FetchConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_configuration_page_is_what_the_model_generates() -> None:
    committed = (REPO / docgen.PAGE).read_text(encoding="utf-8")
    assert committed == docgen.generate(), (
        f"{docgen.PAGE} is out of date with src/clusterfeed/config.py: run {docgen.COMMAND}"
    )


def _table_rows(page: str, heading: str) -> dict[str, list[str]]:
    """The rows of the key table under ``## heading``, by key."""
    start = page.index(f"\n## {heading}\n")
    end = page.find("\n## ", start + 1)
    section = page[start : end if end > 0 else None]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_key_of_a_section_is_on_the_page_with_the_model_default() -> None:
    page = (REPO / docgen.PAGE).read_text(encoding="utf-8")
    rows = _table_rows(page, "`[fetch]`")
    assert set(rows) == set(FetchConfig.model_fields)
    assert rows["concurrency"][2] == f"`{FetchConfig.model_fields['concurrency'].default}`"
    assert rows["concurrency"][1] == "integer, 1 to 100"
    digest = _table_rows(page, "`[digest]`")
    assert "from" in digest and "from_address" not in digest  # the TOML name, not Python's
    assert digest["from"][2] == "required"


def test_a_key_without_a_description_stops_the_generator() -> None:
    class WithNewKey(Config):
        brand_new_key: int = 3

    with pytest.raises(docgen.UndocumentedError, match="brand_new_key"):
        docgen.generate(WithNewKey)


def test_check_command_says_how_to_update_a_stale_page(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / docgen.PAGE, tmp_path / docgen.PAGE)
    command = [sys.executable, "-m", "clusterfeed.docgen", "--check", "--root", str(tmp_path)]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0

    stale = (tmp_path / docgen.PAGE).read_text(encoding="utf-8").replace("`8`", "`9`", 1)
    (tmp_path / docgen.PAGE).write_text(stale, encoding="utf-8")
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 1
    assert f"run {docgen.COMMAND}" in done.stderr

    subprocess.run([*command[:3], "--root", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / docgen.PAGE).read_text(encoding="utf-8") == docgen.generate()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return {_slug(h) for h in re.findall(r"^#{1,6} (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Quick start\n")
    block = re.search(r"```sh\n(.*?)```", readme[start:], flags=re.S)
    assert block
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["scripts/example", "scripts/test"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^scripts/test\b", ci, flags=re.M)
    for needed in ("## Why these libraries", "docs/configuration.md", "docs/commands.md"):
        assert needed in readme
