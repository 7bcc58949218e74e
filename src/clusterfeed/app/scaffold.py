"""``clusterfeed init DIR``: a folder that works on its own, for an operator to start from.

The repository's example config borrows ``../templates`` and writes to ``../var``, so a
copy of its folder alone does not work. ``init`` writes everything a config needs into
one folder instead: a commented starter config, a copy of the standard templates (to
edit), and the bundled example feeds and subscribers (clearly marked as examples), so
that ``check`` passes and ``run --once`` delivers without any network. Every path in
the written config is relative to its folder, so the folder can be moved as a whole.

The sources are read the way ``digest.default_template_dir`` reads the templates: from
the installed package (the wheel carries them under ``clusterfeed/starter`` and
``clusterfeed/default_templates``), else from a source checkout.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import click
import tomlkit

from clusterfeed.digest.digest import default_template_dir

CONFIG_NAME = "clusterfeed.toml"
TEMPLATES = PurePosixPath("templates")
EXAMPLE_FEEDS = PurePosixPath("example-feeds")
EXAMPLE_SUBSCRIBERS = PurePosixPath("example-subscribers.csv")
_FEED_SUFFIXES = (".atom", ".rss", ".rdf", ".xml", ".json")

EXAMPLE_FEEDS_NOTE = """\
These are EXAMPLE partner feeds of a fictional cluster (NordBio, Hamburg, and its
partners), so that a new config works at once without any network.

The [[feeds]] blocks marked EXAMPLE in clusterfeed.toml read them. Replace those blocks
with your partners' feed addresses, run `clusterfeed check`, then delete this folder.
"""


@dataclass(frozen=True)
class StarterFile:
    """One file ``init`` writes: its path inside the target folder and its bytes."""

    path: PurePosixPath
    content: bytes


class StarterConflict(Exception):
    """The target folder already holds files ``init`` would replace."""

    def __init__(self, existing: list[PurePosixPath]) -> None:
        self.existing = existing
        super().__init__(", ".join(str(p) for p in existing))


def _source_checkout() -> Path:
    return Path(__file__).resolve().parents[3]


def starter_source() -> Path:
    """The folder with the starter config (inside the package in both layouts)."""
    return Path(str(resources.files("clusterfeed").joinpath("starter")))


def example_source() -> Path:
    """The folder holding ``example-feeds/`` and ``example-subscribers.csv``.

    An installed wheel has them next to the starter config (pyproject's force-include);
    a source checkout (editable install) has them in the repository's ``config/``.
    """
    packaged = starter_source()
    if (packaged / str(EXAMPLE_FEEDS)).is_dir():
        return packaged
    return _source_checkout() / "config"


def starter_config(text: str, data_dir: Path | None) -> str:
    """The starter config, with its database, published files and mail in ``data_dir``.

    Without ``data_dir`` the text is unchanged (everything under ``var/`` beside the
    config). tomlkit edits the three values in place and keeps every comment, which is
    what a communications manager reads first.
    """
    if data_dir is None:
        return text
    doc = tomlkit.parse(text)
    data = data_dir.as_posix().rstrip("/") or "/"
    joined = data if data.endswith("/") else data + "/"
    doc["publish"]["output_dir"] = joined + "public"
    doc["mail"]["maildir"] = joined + "mail"
    doc["store"]["url"] = f"sqlite:///{joined}clusterfeed.sqlite3"
    return tomlkit.dumps(doc)


def _files_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts)
    )


def starter_files(data_dir: Path | None = None) -> list[StarterFile]:
    """Every file of a new config folder, read from the packaged sources."""
    config = (starter_source() / CONFIG_NAME).read_text(encoding="utf-8")
    files = [StarterFile(PurePosixPath(CONFIG_NAME), starter_config(config, data_dir).encode())]
    templates = default_template_dir()
    for source in _files_in(templates):
        rel = PurePosixPath(source.relative_to(templates).as_posix())
        files.append(StarterFile(TEMPLATES / rel, source.read_bytes()))
    examples = example_source()
    for source in _files_in(examples / str(EXAMPLE_FEEDS)):
        if source.suffix.lower() in _FEED_SUFFIXES:
            files.append(StarterFile(EXAMPLE_FEEDS / source.name, source.read_bytes()))
    files.append(StarterFile(EXAMPLE_FEEDS / "README.txt", EXAMPLE_FEEDS_NOTE.encode()))
    subscribers = examples / str(EXAMPLE_SUBSCRIBERS)
    files.append(StarterFile(EXAMPLE_SUBSCRIBERS, subscribers.read_bytes()))
    return files


def existing_files(target: Path, files: list[StarterFile]) -> list[PurePosixPath]:
    """The files of ``files`` already in ``target``, relative to it (a link counts too)."""
    return [f.path for f in files if os.path.lexists(target / f.path)]


def write_starter(target: Path, files: list[StarterFile], *, force: bool = False) -> None:
    """Write ``files`` into ``target``; refuse before writing anything if one exists.

    Each file is written to a temporary name and renamed over its place, so a link at
    that place is replaced, not followed, and an interrupted run leaves no half file.
    """
    clashes = existing_files(target, files)
    if clashes and not force:
        raise StarterConflict(clashes)
    for f in files:
        dest = target / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(f.content)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _fail(lines: list[str]) -> None:
    for line in lines:
        click.echo(line, err=True)
    sys.exit(2)


@click.command("init")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the database, published files and mail (default: var/ in DIR); "
    "written into the config as an absolute path.",
)
@click.option(
    "--force", is_flag=True, help="Replace the files init writes if DIR has them (others stay)."
)
def init_command(folder: Path, data_dir: Path | None, force: bool) -> None:
    """Write a working starter config, the templates and example feeds into DIR."""
    target = folder.absolute()
    if target.exists() and not target.is_dir():
        _fail([f"error: {folder} is a file; give the name of a folder (new or existing)."])
    files = starter_files(data_dir.absolute() if data_dir else None)
    try:
        write_starter(target, files, force=force)
    except StarterConflict as exc:
        _fail(
            [f"error: {folder} already holds files that init would replace:"]
            + [f"  {folder / p}" for p in exc.existing]
            + ["Nothing was written. Choose another folder, move these away, or run "
               "again with --force to replace them (changes made in them are lost)."]
        )  # fmt: skip
    except OSError as exc:
        _fail([f"error: cannot write into {folder}: {exc.strerror or exc}"])
    config = folder / CONFIG_NAME
    counts = {top: sum(1 for f in files if f.path.parts[0] == str(top)) for top in
              (TEMPLATES, EXAMPLE_FEEDS)}  # fmt: skip
    click.echo(
        f"wrote {config} (start here), {counts[TEMPLATES]} templates in "
        f"{folder / str(TEMPLATES)}, the EXAMPLE feeds in {folder / str(EXAMPLE_FEEDS)} "
        f"and EXAMPLE subscribers in {folder / str(EXAMPLE_SUBSCRIBERS)}"
    )
    click.echo("Next:")
    click.echo(f"  1. open {config} and change what it lists under WHAT TO CHANGE FIRST")
    click.echo(f"  2. clusterfeed check --config {config}")
    click.echo(f"  3. clusterfeed run --once --config {config}")
