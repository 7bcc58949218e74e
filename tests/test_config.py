"""The operator's config: the bundled example validates, every mistake is reported at once.

An operator is not a programmer: each problem must name the file, the key, the value
that was found and what is expected, and one round of editing must be enough to fix
them all. Paths in a config are relative to the config's folder, so a copied config
folder works from anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfeed.config import ConfigError, Problem, advice, all_subscribers, load_config
from tests.conftest import REPO, write_config

EXAMPLE = REPO / "config" / "example.toml"
# The command the venv installed, next to the interpreter that runs the tests.
CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))


def _problems(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def _by_key(problems: list[Problem]) -> dict[str, str]:
    by_key: dict[str, str] = {}
    for p in problems:
        assert p.key not in by_key, f"two problems for {p.key}: {problems}"
        by_key[p.key] = p.message
    return by_key


def _clusterfeed(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed command, as an operator runs it (a new process, its own cwd)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CLUSTERFEED_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [CLUSTERFEED, *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the bundled example ----------------------------------------------------------------


def test_bundled_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)

    assert config.source == EXAMPLE
    assert len(config.feeds) >= 8
    assert {f.language for f in config.feeds} >= {"de", "en", "ja"}
    # Local feed paths became absolute paths of files that exist.
    for feed in config.feeds:
        assert Path(feed.url).is_absolute() and Path(feed.url).is_file(), feed.url
    # Subscribers come from the file and from the CSV it names.
    emails = {s.email for s in all_subscribers(config)}
    assert {"lena.vogt@example.org", "maria.schmidt@example.org"} <= emails
    assert config.mail.transport == "maildir"


def test_check_accepts_the_bundled_example(run_cli) -> None:
    result = run_cli("check", "--config", EXAMPLE)

    assert result.exit_code == 0, result.output
    assert f"{EXAMPLE}: OK" in result.stdout
    assert "9 feeds, 5 subscribers" in result.stdout
    assert "mail via maildir" in result.stdout
    assert result.stderr == ""


# -- valid, but wrong for the mail's readers: warnings ----------------------------------------

SMTP = {"transport": "smtp", "host": "127.0.0.1", "port": 2525, "security": "none"}


@pytest.fixture
def dkim_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real key in the environment, for the configs below that sign."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    monkeypatch.setenv("CLUSTERFEED_DKIM_KEY", pem.decode("ascii"))


def _config_with(tmp_path: Path, base_url: str, dkim_domain: str | None = None) -> Path:
    extra = ""
    if dkim_domain is not None:
        extra = (
            f'[mail.dkim]\nselector = "news2026"\ndomain = "{dkim_domain}"\n'
            'private_key_env = "CLUSTERFEED_DKIM_KEY"\n'
        )
    feed = {"name": "Helix Vektor", "url": str(REPO / "config/example-feeds/helix-vektor.rss")}
    path = write_config(tmp_path, [feed], mail=SMTP, extra=extra)
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text.replace('base_url = "https://news.nordbio.example"', f'base_url = "{base_url}"'),
        encoding="utf-8",
    )
    return path


@pytest.mark.usefixtures("dkim_key")
def test_the_example_and_a_sound_smtp_setup_get_no_warnings(tmp_path: Path, run_cli) -> None:
    assert advice(load_config(EXAMPLE)) == []
    sound = _config_with(tmp_path, "https://news.nordbio.example", "nordbio.example")
    assert advice(load_config(sound)) == []
    # A signing domain in the same organizational domain aligns (DMARC relaxed mode).
    for domain in ("mail.nordbio.example", "NordBio.example"):
        assert advice(load_config(_config_with(tmp_path, "https://x.example", domain))) == []
    assert "warning" not in run_cli("check", "--config", sound).output


def test_links_to_this_machine_or_without_https_are_warned_about(tmp_path: Path, run_cli) -> None:
    (local,) = advice(load_config(_config_with(tmp_path, "http://127.0.0.1:8080")))
    assert "web.base_url 'http://127.0.0.1:8080' is this machine" in local
    assert "lead nowhere" in local
    (plain,) = advice(load_config(_config_with(tmp_path, "http://news.nordbio.example")))
    assert "is not https" in plain and "RFC 8058" in plain

    result = run_cli("check", "--config", _config_with(tmp_path, "http://news.nordbio.example"))
    assert result.exit_code == 0  # a warning, not an error
    assert "warning: web.base_url 'http://news.nordbio.example' is not https" in result.stdout


@pytest.mark.usefixtures("dkim_key")
def test_a_dkim_domain_that_cannot_align_with_the_sender_is_warned_about(tmp_path: Path) -> None:
    (warning,) = advice(load_config(_config_with(tmp_path, "https://x.example", "mailer.example")))
    assert "mail.dkim.domain 'mailer.example'" in warning
    assert "'nordbio.example'" in warning and "DMARC" in warning


# -- many problems, all at once ------------------------------------------------------------

INVALID = """\
[cluster]
name = "NordBio Cluster"
url = "https://www.nordbio.example"

[schedule]
fetch_interval_minutes = "often"
digest_cron = "0 7 * *"
timezone = "Europe/Hamburg"

[digest]
group_by = "topic"

[mial]
transport = "maildir"

[mail]
transport = "smtp"

[[feeds]]
name = "Helix Vektor"
url = "feeds/missing.rss"

[[feeds]]
name = "Elbmed Pharma"
url = "https://www.elbmed.example/news.atom"
lanugage = "de"

[[feeds]]
name = "Kansai Bio Frontier"
url = "https://kansai-bio.example/rss"
language = "japanese"

[[feeds]]
name = "Helix Vektor"
url = "https://www.helixvektor.example/feed"
topics = "gene-therapy"
"""

# key path -> fragments its message must contain: the value found and what is expected.
EXPECTED = {
    "schedule.fetch_interval_minutes": ['"often"', "whole number without quotes"],
    "schedule.digest_cron": ['"0 7 * *"', "five fields", "minute hour day month weekday"],
    "schedule.timezone": ['"Europe/Hamburg"', "IANA time zone", "Europe/Berlin"],
    "digest.from": ["required key is missing: add from = ... to digest"],
    "mial": ['unknown key "mial" — did you mean "mail"?'],
    "mail.host": ['transport "smtp" needs host'],
    "feeds[0].url": ['"feeds/missing.rss"', "neither an http(s) URL nor an existing file"],
    "feeds[1].lanugage": ['unknown key "lanugage" — did you mean "language"?', "allowed here:"],
    "feeds[2].language": ['"japanese"', 'language code such as "de", "en" or "ja"'],
    "feeds[3].name": ['"Helix Vektor"', "already the name of entry 1"],
    "feeds[3].topics": ['"gene-therapy"', "write a list in square brackets"],
}
# How each problem's place is named for the operator: feeds by name and position.
PLACES = {
    "mial": "",
    "feeds[0].url": 'feeds "Helix Vektor" (entry 1), url',
    "feeds[1].lanugage": 'feeds "Elbmed Pharma" (entry 2)',
    "feeds[2].language": 'feeds "Kansai Bio Frontier" (entry 3), language',
    "feeds[3].name": 'feeds "Helix Vektor" (entry 4), name',
    "feeds[3].topics": 'feeds "Helix Vektor" (entry 4), topics',
}


def _line(path: Path, key: str) -> str:
    place = PLACES.get(key, key)
    return f"{path}: {place}: " if place else f"{path}: "


def test_invalid_config_lists_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "clusterfeed.toml"
    path.write_text(INVALID, encoding="utf-8")

    problems = _problems(path)

    by_key = _by_key(problems)
    assert set(by_key) == set(EXPECTED), "\n".join(map(str, problems))
    for key, fragments in EXPECTED.items():
        for fragment in fragments:
            assert fragment in by_key[key], f"{key}: {by_key[key]!r} lacks {fragment!r}"
    for problem in problems:
        assert problem.file == path
        assert str(problem) == _line(path, problem.key) + problem.message
        assert "[" not in str(problem).removeprefix(str(path)).split(":")[1]  # no feeds[0]
    assert "Input should be" not in "\n".join(map(str, problems))


def test_check_prints_every_problem_and_fails(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "clusterfeed.toml"
    path.write_text(INVALID, encoding="utf-8")

    result = run_cli("check", "--config", path)

    assert result.exit_code != 0
    assert "OK" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == len(EXPECTED)
    for key in EXPECTED:
        assert any(line.startswith(f"error: {_line(path, key)}") for line in lines), key
    assert (
        f'error: {path}: feeds "Elbmed Pharma" (entry 2): unknown key "lanugage" — '
        'did you mean "language"? Keys allowed here: ' in result.stderr
    )
    assert f"{len(EXPECTED)} problems in the config." in result.stderr
    assert "Traceback" not in result.output


def test_other_commands_refuse_an_invalid_config_the_same_way(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "clusterfeed.toml"
    path.write_text(INVALID, encoding="utf-8")

    result = run_cli("fetch", "--config", path)

    assert result.exit_code == 2
    assert f"error: {path}: schedule.timezone: " in result.stderr
    assert not (tmp_path / "clusterfeed.sqlite3").exists()


def test_smtp_password_variable_must_be_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CF_TEST_SMTP_PASSWORD", raising=False)
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
        mail={
            "transport": "smtp",
            "host": "mail.example.org",
            "username": "news",
            "password_env": "CF_TEST_SMTP_PASSWORD",
        },
    )

    by_key = _by_key(_problems(path))

    assert set(by_key) == {"mail.password_env"}
    assert "CF_TEST_SMTP_PASSWORD is not set" in by_key["mail.password_env"]

    monkeypatch.setenv("CF_TEST_SMTP_PASSWORD", "s3cret")
    assert load_config(path).mail.password_env == "CF_TEST_SMTP_PASSWORD"


def test_store_url_from_an_environment_variable(tmp_path: Path, monkeypatch) -> None:
    """As the docker compose setup passes it: the URL (with its password) stays out of the
    file; a variable that is not set stops clusterfeed instead of falling back to SQLite."""
    monkeypatch.delenv("CF_TEST_STORE_URL", raising=False)
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
    )
    text = path.read_text(encoding="utf-8").replace(
        'url = "sqlite:///state.sqlite3"', 'url_env = "CF_TEST_STORE_URL"'
    )
    path.write_text(text, encoding="utf-8")

    by_key = _by_key(_problems(path))

    assert set(by_key) == {"store.url_env"}
    assert "CF_TEST_STORE_URL is not set" in by_key["store.url_env"]

    url = "postgresql+psycopg://clusterfeed:s3cret@db:5432/clusterfeed"
    monkeypatch.setenv("CF_TEST_STORE_URL", url)
    assert load_config(path).database_url == url


def test_password_env_without_username_is_reported_at_its_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
        mail={"transport": "smtp", "host": "mail.example.org", "password_env": "X"},
    )

    messages = [p.message for p in _problems(path) if p.key == "mail.password_env"]

    assert any("password_env is set but username is not" in m for m in messages), messages


def test_toml_syntax_error_names_file_and_line(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "clusterfeed.toml"
    path.write_text('[cluster]\nname = "NordBio"\nurl = https://www.nordbio.example\n')

    problems = _problems(path)

    assert len(problems) == 1
    assert problems[0].file == path
    assert "TOML syntax error" in problems[0].message
    assert "line 3" in problems[0].message

    result = run_cli("check", "--config", path)
    assert result.exit_code != 0
    assert str(path) in result.stderr and "line 3" in result.stderr


def test_missing_config_file_says_how_to_name_one(tmp_path: Path, run_cli) -> None:
    missing = tmp_path / "nowhere.toml"

    result = run_cli("check", "--config", missing)

    assert result.exit_code != 0
    assert str(missing) in result.stderr
    assert "CLUSTERFEED_CONFIG" in result.stderr


# -- subscribers from a CSV --------------------------------------------------------------


def test_subscriber_csv_problem_names_the_line(tmp_path: Path) -> None:
    csv_file = tmp_path / "subscribers.csv"
    csv_file.write_text(
        "email,name,topics\n"
        "maria.schmidt@example.org,Maria Schmidt,gene-therapy\n"
        "kenji.tanaka-at-example.net,Kenji Tanaka,\n"
        "office@example.com,Kai Jensen,\n",
        encoding="utf-8",
    )
    path = write_config(tmp_path, [{"name": "Partner", "url": "https://partner.example/feed"}])
    path.write_text('subscribers_csv = "subscribers.csv"\n' + path.read_text())

    problems = _problems(path)

    assert len(problems) == 1
    assert problems[0].file == csv_file
    assert problems[0].key == "line 3, column email"
    assert "kenji.tanaka-at-example.net" in problems[0].message
    assert "not a valid e-mail address" in problems[0].message


def test_a_csv_value_of_the_wrong_kind_says_what_to_write(tmp_path: Path) -> None:
    csv_file = tmp_path / "subscribers.csv"
    csv_file.write_text(
        "email,name,topics,languages,frequency\nnina@example.org,Nina,,,monthly\n",
        encoding="utf-8",
    )
    path = write_config(tmp_path, [{"name": "Partner", "url": "https://partner.example/feed"}])
    path.write_text('subscribers_csv = "subscribers.csv"\n' + path.read_text())

    (problem,) = _problems(path)

    assert problem.key == "line 2, column frequency"
    assert problem.message == "found \"monthly\"; use one of 'daily' or 'weekly'"


def test_subscribers_from_csv_and_config_are_merged(tmp_path: Path) -> None:
    (tmp_path / "subscribers.csv").write_text(
        "email,name,topics,languages,frequency\n"
        "maria.schmidt@example.org,Maria Schmidt,gene-therapy;financing,de;en,daily\n"
        "reader@example.org,Old Name,,,weekly\n",
        encoding="utf-8",
    )
    path = write_config(tmp_path, [{"name": "Partner", "url": "https://partner.example/feed"}])
    path.write_text('subscribers_csv = "subscribers.csv"\n' + path.read_text())

    subs = {s.email: s for s in all_subscribers(load_config(path))}

    assert set(subs) == {"maria.schmidt@example.org", "reader@example.org"}
    assert subs["maria.schmidt@example.org"].topics == ["gene-therapy", "financing"]
    assert subs["maria.schmidt@example.org"].languages == ["de", "en"]
    # The config file's own entry wins over the CSV row for the same address.
    assert subs["reader@example.org"].name == "Rita Reader"
    assert subs["reader@example.org"].frequency == "daily"


# -- paths and where the config is found --------------------------------------------------


def test_relative_paths_are_relative_to_the_config_folder(
    example_copy: Path, tmp_path: Path, monkeypatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(example_copy)

    folder = example_copy.parent
    assert Path(config.feeds[0].url) == folder / "example-feeds" / "nordbio-en.atom"
    assert config.subscribers_csv == folder / "example-subscribers.csv"
    assert config.mail.maildir == tmp_path / "var" / "mail"
    assert config.publish.output_dir == tmp_path / "var" / "public"
    assert config.digest.templates_dir == tmp_path / "templates"
    assert config.database_url == f"sqlite:///{tmp_path / 'var' / 'clusterfeed.sqlite3'}"


def test_default_store_is_a_sqlite_file_next_to_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, [{"name": "Partner", "url": "https://partner.example/feed"}])
    path.write_text(path.read_text().replace('[store]\nurl = "sqlite:///state.sqlite3"', ""))

    config = load_config(path)

    assert config.database_url == f"sqlite:///{tmp_path / 'clusterfeed.sqlite3'}"


def test_copied_config_folder_works_from_any_directory(example_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = os.path.relpath(example_copy, elsewhere)

    fetched = _clusterfeed("fetch", "--config", relative, cwd=elsewhere)
    published = _clusterfeed("publish", "--config", relative, cwd=elsewhere)

    assert fetched.returncode == 0, fetched.stderr
    assert "fetched 9 feeds: 47 new items, 0 failed" in fetched.stdout
    assert published.returncode == 0, published.stderr
    feed = tmp_path / "var" / "public" / "feed.atom"
    assert f"wrote: {feed}" in published.stdout
    assert feed.is_file()
    assert (tmp_path / "var" / "clusterfeed.sqlite3").is_file()
    assert not any(elsewhere.iterdir()), "nothing may land in the working directory"


def test_config_is_found_through_the_environment_variable(
    example_copy: Path, tmp_path: Path
) -> None:
    result = _clusterfeed("check", cwd=tmp_path, env={"CLUSTERFEED_CONFIG": str(example_copy)})

    assert result.returncode == 0, result.stderr
    assert f"{example_copy}: OK" in result.stdout


def test_without_config_option_or_variable_the_default_path_is_named(tmp_path: Path) -> None:
    result = _clusterfeed("check", cwd=tmp_path)

    assert result.returncode != 0
    assert str(tmp_path / "config" / "clusterfeed.toml") in result.stderr
    assert "CLUSTERFEED_CONFIG" in result.stderr


@pytest.mark.parametrize(
    ("cron", "fragment"),
    [
        ("0 7 * * 8", "0 and 7 are Sunday"),
        ("0 7 * * 5-1", "rising range"),
        ("0 25 * * *", '"0 25 * * *"'),
    ],
)
def test_a_bad_cron_day_or_hour_is_refused(tmp_path: Path, cron: str, fragment: str) -> None:
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
        extra=f'[schedule]\ndigest_cron = "{cron}"\n',
    )

    by_key = _by_key(_problems(path))

    assert set(by_key) == {"schedule.digest_cron"}
    assert fragment in by_key["schedule.digest_cron"]
    assert "five fields" in by_key["schedule.digest_cron"]


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ("fetch_interval_minutes = 0", "found 0; use a number at least 1"),
        (
            "fetch_interval_minutes = 2.5",
            "found 2.5; write a whole number without quotes, such as 30",
        ),
        ('timezone = ["Europe/Berlin"]', "found ['Europe/Berlin']; write text in double quotes"),
    ],
)
def test_type_errors_read_as_what_to_write(tmp_path: Path, schedule: str, words: str) -> None:
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
        extra=f"[schedule]\n{schedule}\n",
    )

    (problem,) = _problems(path)

    assert problem.message == words, problem.message
    assert str(problem).startswith(f"{path}: schedule.")
