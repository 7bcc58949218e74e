"""The ``docker compose`` setup (compose.yaml): PostgreSQL, a one-shot migration, the
scheduler, N workers and the web app, as docs/operations.md ("Docker Compose") describes.

There is no Docker daemon to start it here, so everything that can be checked without
one is: the services and the order they start in, that every command is a real
``clusterfeed`` command with real options, and that the config they share
(config/compose.toml) puts what clusterfeed writes into the volumes they share.

PyYAML is not a dependency; ``read_yaml`` below reads the part of YAML compose.yaml
uses (block mappings and lists, JSON-style flow lists, anchors and ``<<`` merges) and
fails loudly on anything else, so the file stays plain.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from clusterfeed.config import load_config
from tests.conftest import REPO

COMPOSE = REPO / "compose.yaml"
CLUSTERFEED_SERVICES = {"migrate", "scheduler", "worker", "web"}


# -- a reader for the YAML that compose.yaml uses -------------------------------------------


def _lines(text: str) -> list[tuple[int, str]]:
    found = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            found.append((len(raw) - len(raw.lstrip(" ")), stripped))
    return found


def _scalar(text: str) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        assert text.endswith("'"), text
        return text[1:-1]
    if text.startswith("["):
        return json.loads(text)
    text = re.sub(r"\s+#.*$", "", text)
    assert not text.startswith(("{", "|", ">", "&", "*", "!")), f"not read here: {text}"
    return text


def _block(lines: list[tuple[int, str]], i: int, anchors: dict[str, Any]) -> tuple[Any, int]:
    indent = lines[i][0]
    if lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            items.append(_scalar(lines[i][1][2:].strip()))
            i += 1
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        key, colon, rest = lines[i][1].partition(":")
        assert colon, f"not a mapping entry: {lines[i][1]}"
        rest = re.sub(r"^\s*#.*$", "", rest).strip()
        i += 1
        anchor = None
        if rest.startswith("&"):
            anchor, rest = rest[1:], ""
        if key == "<<":
            assert rest.startswith("*"), "a merge names an anchor"
            mapping.update(anchors[rest[1:]])
            continue
        if rest.startswith("*"):
            value = anchors[rest[1:]]
        elif rest:
            value = _scalar(rest)
        elif i < len(lines) and lines[i][0] > indent:
            value, i = _block(lines, i, anchors)
        else:
            value = None
        if anchor:
            anchors[anchor] = value
        mapping[key] = value
    assert i == len(lines) or lines[i][0] < indent, f"bad indentation at {lines[i][1]}"
    return mapping, i


def read_yaml(text: str) -> Any:
    lines = _lines(text)
    value, end = _block(lines, 0, {})
    assert end == len(lines)
    return value


def test_the_reader_reads_anchors_merges_and_lists() -> None:
    text = 'a: &base\n  b: "x y"\n  c: ["p", "q"]\nd:\n  <<: *base\n  e:\n    - 1:2  # note\n'
    assert read_yaml(text) == {
        "a": {"b": "x y", "c": ["p", "q"]},
        "d": {"b": "x y", "c": ["p", "q"], "e": ["1:2"]},
    }


# -- compose.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    value = read_yaml(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(value, dict)
    return value


def _env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ${VAR:-default} as the default (nothing is set)."""
    return {
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service["environment"].items()
    }


def test_the_services_and_the_order_they_start_in(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"db", *CLUSTERFEED_SERVICES}
    db = services["db"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    (db_volume,) = db["volumes"]
    name, target = db_volume.split(":")
    assert target == "/var/lib/postgresql/data" and name in compose["volumes"]
    # The schema first, once; then the rest, only after it succeeded.
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ("scheduler", "worker", "web"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}
        }
    # Several workers, each given time to finish its tasks when stopped.
    assert int(services["worker"]["deploy"]["replicas"]) >= 2
    assert "stop_grace_period" in services["worker"]
    assert "deploy" not in services["scheduler"], "exactly one scheduler"
    # The web app listens where its port is published.
    web = services["web"]["command"]
    (ports,) = services["web"]["ports"]
    assert ports == f"{web[web.index('--port') + 1]}:{web[web.index('--port') + 1]}"
    assert web[web.index("--host") + 1] == "0.0.0.0"


def test_every_command_is_a_real_clusterfeed_command(compose: dict[str, Any], run_cli: Any) -> None:
    for name in sorted(CLUSTERFEED_SERVICES):
        command = compose["services"][name]["command"]
        assert command[0] == "clusterfeed", name
        # click reads every option before it answers --help: a misspelt one fails.
        result = run_cli(*command[1:], "--help")
        assert result.exit_code == 0, f"{name}: {shlex.join(command)}: {result.output}"
        assert f" {command[1]} [OPTIONS]" in result.output


def test_the_config_they_share_writes_into_the_volumes_they_share(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    db_env = _env(services["db"])
    first = _env(services["scheduler"])
    for name in CLUSTERFEED_SERVICES:
        assert _env(services[name]) == first, f"{name} runs with another environment"
        assert services[name]["volumes"] == services["scheduler"]["volumes"]
    mounts = dict(v.split(":")[1::-1] for v in services["worker"]["volumes"])  # target: source

    # The config: a file of ./config, mounted where CLUSTERFEED_CONFIG looks for it.
    container_config = Path(first["CLUSTERFEED_CONFIG"])
    host_folder = mounts[str(container_config.parent)]
    assert host_folder == "./config"
    host_config = REPO / host_folder / container_config.name
    monkeypatch.setenv("CLUSTERFEED_STORE_URL", first["CLUSTERFEED_STORE_URL"])
    config = load_config(host_config)  # the example feeds are in the mounted folder

    # The store: the URL from the environment names the db service and its database.
    assert config.store.url_env == "CLUSTERFEED_STORE_URL"
    url = urlsplit(config.database_url)
    assert url.scheme == "postgresql+psycopg" and url.hostname == "db"
    assert url.username == db_env["POSTGRES_USER"] and url.password == db_env["POSTGRES_PASSWORD"]
    assert url.path == "/" + db_env["POSTGRES_DB"]

    # What the workers write (published files, mail), in a named volume the web app reads.
    named = {target: source for target, source in mounts.items() if source in compose["volumes"]}
    for written in (config.publish.output_dir, config.mail.maildir):
        assert written is not None
        assert any(Path(target) in written.parents for target in named), written


def test_the_operations_page_shows_how_to_run_and_scale_it(compose: dict[str, Any]) -> None:
    page = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    start = page.index("\n## Docker Compose\n")
    end = page.find("\n## ", start + 1)
    section = page[start:end] if end > 0 else page[start:]
    assert "docker compose up -d" in section
    assert "--scale worker=" in section
    for name in compose["services"]:
        assert f"`{name}`" in section, f"the page does not explain the {name} service"
