"""``clusterfeed init DIR``: a config folder that works on its own, wherever it is.

Every test drives the installed command in new processes, from working directories
other than the config's, and then runs ``check`` and ``run --once`` on what ``init``
wrote: the proof is the delivered mail and the published feed, not the file list.
"""

from __future__ import annotations

import csv
import email
import email.policy
import os
import subprocess
import sys
import zipfile
from email.message import EmailMessage
from pathlib import Path

import feedparser
import pytest

from tests.conftest import EXAMPLE_STORIES, REPO, digest_titles

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))


def _clusterfeed(
    *args: str | Path, cwd: Path, python_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERFEED_CONFIG"}
    command = [CLUSTERFEED]
    if python_path is not None:  # the package from another place (an unpacked wheel)
        env["PYTHONPATH"] = str(python_path)
        command = [sys.executable, "-m", "clusterfeed"]
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def _mails(maildir: Path) -> list[EmailMessage]:
    new = maildir / "new"
    files = sorted(new.iterdir()) if new.is_dir() else []
    return [email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files]


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """Where the operator types ``init``, and another folder they later work from."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    return home, elsewhere


def test_init_writes_a_folder_that_checks_and_runs_from_another_directory(
    tmp_path: Path,
) -> None:
    home, elsewhere = _folders(tmp_path)

    made = _clusterfeed("init", "newsroom", cwd=home)

    assert made.returncode == 0, made.stderr
    folder = home / "newsroom"
    config = folder / "clusterfeed.toml"
    assert f"wrote {Path('newsroom') / 'clusterfeed.toml'} (start here)" in made.stdout
    assert f"clusterfeed check --config {Path('newsroom') / 'clusterfeed.toml'}" in made.stdout
    relative = os.path.relpath(config, elsewhere)

    checked = _clusterfeed("check", "--config", relative, cwd=elsewhere)
    ran = _clusterfeed("run", "--once", "--config", relative, cwd=elsewhere)

    assert checked.returncode == 0, checked.stderr
    named = checked.stdout.splitlines()[0].removesuffix(": OK")
    assert Path(named).resolve() == config.resolve()
    assert "9 feeds, 3 subscribers" in checked.stdout
    assert ran.returncode == 0, ran.stderr
    assert "fetched 9 feeds: 47 new items, 0 failed" in ran.stdout
    maildir = folder / "var" / "mail"
    assert f"digest: 3 sent of 3 planned → {maildir / 'new'}" in ran.stdout
    with (folder / "example-subscribers.csv").open(encoding="utf-8") as handle:
        expected = {row["email"] for row in csv.DictReader(handle)}
    mails = _mails(maildir)
    assert {m["To"].addresses[0].addr_spec for m in mails} == expected
    assert all(digest_titles(m) for m in mails), "every digest lists stories"
    assert all(m["From"].addresses[0].addr_spec == "news@example.org" for m in mails)
    feed = feedparser.parse((folder / "var" / "public" / "feed.atom").read_bytes())
    assert not feed.bozo and len(feed.entries) == EXAMPLE_STORIES
    assert feed.feed.title == "Your Cluster – news from our partners"
    assert not any(elsewhere.iterdir()), "nothing may land in the working directory"


def test_the_copied_templates_are_the_ones_the_config_uses(tmp_path: Path) -> None:
    home, elsewhere = _folders(tmp_path)
    assert _clusterfeed("init", "cfg", cwd=home).returncode == 0
    (home / "cfg" / "templates" / "digest_subject.txt").write_text(
        "Our own subject line\n", encoding="utf-8"
    )

    ran = _clusterfeed(
        "run", "--once", "--config", home / "cfg" / "clusterfeed.toml", cwd=elsewhere
    )

    assert ran.returncode == 0, ran.stderr
    subjects = {m["Subject"] for m in _mails(home / "cfg" / "var" / "mail")}
    assert subjects == {"Our own subject line"}


def test_init_refuses_to_replace_files_and_names_them(tmp_path: Path) -> None:
    home, _ = _folders(tmp_path)
    folder = home / "cfg"
    folder.mkdir()
    own = "# my config, edited for a week\n"
    (folder / "clusterfeed.toml").write_text(own, encoding="utf-8")
    (folder / "templates").mkdir()
    (folder / "templates" / "digest.html").write_text("<p>mine</p>", encoding="utf-8")

    refused = _clusterfeed("init", "cfg", cwd=home)

    assert refused.returncode == 2
    assert "error: cfg already holds files that init would replace:" in refused.stderr
    named = {line.strip() for line in refused.stderr.splitlines() if line.startswith("  ")}
    assert named == {str(Path("cfg/clusterfeed.toml")), str(Path("cfg/templates/digest.html"))}
    assert "Nothing was written" in refused.stderr and "--force" in refused.stderr
    assert (folder / "clusterfeed.toml").read_text(encoding="utf-8") == own
    assert sorted(p.name for p in folder.rglob("*")) == ["clusterfeed.toml", "digest.html",
                                                         "templates"]  # fmt: skip


def test_init_force_replaces_its_own_files_and_leaves_the_data_alone(tmp_path: Path) -> None:
    home, _ = _folders(tmp_path)
    assert _clusterfeed("init", "cfg", cwd=home).returncode == 0
    config = home / "cfg" / "clusterfeed.toml"
    config.write_text("broken = [", encoding="utf-8")
    data = home / "cfg" / "var" / "clusterfeed.sqlite3"
    data.parent.mkdir()
    data.write_bytes(b"stored")

    forced = _clusterfeed("init", "cfg", "--force", cwd=home)

    assert forced.returncode == 0, forced.stderr
    assert "WHAT TO CHANGE FIRST" in config.read_text(encoding="utf-8")
    assert data.read_bytes() == b"stored"
    assert _clusterfeed("check", "--config", config, cwd=home).returncode == 0


def test_init_over_a_link_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    home, _ = _folders(tmp_path)
    elsewhere_file = tmp_path / "precious.toml"
    elsewhere_file.write_text("precious", encoding="utf-8")
    (home / "cfg").mkdir()
    (home / "cfg" / "clusterfeed.toml").symlink_to(elsewhere_file)

    refused = _clusterfeed("init", "cfg", cwd=home)
    forced = _clusterfeed("init", "cfg", "--force", cwd=home)

    assert refused.returncode == 2 and str(Path("cfg/clusterfeed.toml")) in refused.stderr
    assert forced.returncode == 0, forced.stderr
    assert elsewhere_file.read_text(encoding="utf-8") == "precious"
    assert not (home / "cfg" / "clusterfeed.toml").is_symlink()


def test_init_into_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")

    result = _clusterfeed("init", "notes.txt", cwd=tmp_path)

    assert result.returncode == 2
    assert "notes.txt is a file" in result.stderr


def test_init_data_option_puts_database_feeds_and_mail_there(tmp_path: Path) -> None:
    home, elsewhere = _folders(tmp_path)
    data = tmp_path / "volume"

    made = _clusterfeed("init", "cfg", "--data", data, cwd=home)
    ran = _clusterfeed(
        "run", "--once", "--config", home / "cfg" / "clusterfeed.toml", cwd=elsewhere
    )

    assert made.returncode == 0, made.stderr
    assert ran.returncode == 0, ran.stderr
    assert (data / "clusterfeed.sqlite3").is_file()
    assert (data / "public" / "feed.atom").is_file()
    assert len(_mails(data / "mail")) == 3
    assert not (home / "cfg" / "var").exists()
    text = (home / "cfg" / "clusterfeed.toml").read_text(encoding="utf-8")
    assert "# The database that remembers every item" in text, "the comments are kept"


def test_every_setting_of_the_starter_config_is_explained(tmp_path: Path) -> None:
    """A communications manager reads the file top to bottom: each key (outside the
    example [[feeds]] blocks, which one comment explains) has a comment above it, in the
    same paragraph, or beside it."""
    assert _clusterfeed("init", "cfg", cwd=tmp_path).returncode == 0
    lines = (tmp_path / "cfg" / "clusterfeed.toml").read_text(encoding="utf-8").splitlines()

    unexplained = []
    table = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            table = line
        if table == "[[feeds]]" or not line or line[0] in "#[ ]" or "=" not in line:
            continue
        paragraph = []
        for above in reversed(lines[:i]):
            if not above.strip() or above.startswith("["):
                break
            paragraph.append(above)
        if "#" not in line and not any(p.startswith("#") for p in paragraph):
            unexplained.append(line)
    assert unexplained == []
    header = "\n".join(lines[:30])
    assert "WHAT TO CHANGE FIRST" in header and "relative to the folder this file is in" in header


def test_the_example_config_says_exactly_what_to_copy() -> None:
    header = (REPO / "config" / "example.toml").read_text(encoding="utf-8").split("\n\n")[0]

    assert "clusterfeed init" in header
    assert "config/ and templates/" in header
    assert "Copy this folder, edit it" not in header


# -- from a built wheel, not the source checkout ------------------------------------------


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from this checkout, unpacked as an install would place it."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here (no build backend reachable): {built.stderr}")
    (wheel,) = out.glob("clusterfeed-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_init_works_from_an_installed_wheel(unpacked_wheel: Path, tmp_path: Path) -> None:
    home, elsewhere = _folders(tmp_path)
    where = subprocess.run(
        [sys.executable, "-c", "import clusterfeed.app.scaffold as s; print(s.example_source())"],
        env={**os.environ, "PYTHONPATH": str(unpacked_wheel)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(unpacked_wheel), "the wheel's own copy"

    made = _clusterfeed("init", "cfg", cwd=home, python_path=unpacked_wheel)
    config = home / "cfg" / "clusterfeed.toml"
    checked = _clusterfeed("check", "--config", config, cwd=elsewhere, python_path=unpacked_wheel)
    ran = _clusterfeed(
        "run", "--once", "--config", config, cwd=elsewhere, python_path=unpacked_wheel
    )

    assert made.returncode == 0, made.stderr
    assert checked.returncode == 0, checked.stderr
    assert ran.returncode == 0, ran.stderr
    assert len(_mails(home / "cfg" / "var" / "mail")) == 3
    assert sorted(p.name for p in (home / "cfg" / "templates").iterdir()) == sorted(
        p.name for p in (REPO / "templates").iterdir()
    )
