"""The Docker image: the README's commands must work as written.

Where a Docker daemon is present, one test builds the image, starts it with the
README's ``docker run`` and reads the served feed. Everything that can be checked
without a daemon is checked anyway: the build context (.dockerignore), that the README,
the Dockerfile and the entry point agree, and the entry point itself, run on this
machine against temporary folders standing in for the volumes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import feedparser
import httpx
import pytest

from tests.conftest import EXAMPLE_STORIES, REPO

ENTRYPOINT_SCRIPT = REPO / "scripts" / "docker-entrypoint"
VENV_BIN = str(Path(sys.executable).parent)


# -- reading the Dockerfile, the .dockerignore and the README ------------------------------


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (NAME, arguments), continuation lines joined."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, args = line.partition(" ")
            found.append((name.upper(), args.strip()))
    return found


def _one(name: str) -> str:
    (args,) = [a for n, a in _instructions() if n == name]
    return args


def _exec_form(name: str) -> list[str]:
    value = json.loads(_one(name))
    assert isinstance(value, list), f"{name} must be in exec form (a JSON list)"
    return value


def _docker_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Docker\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def _readme_command(verb: str) -> list[str]:
    """The ``docker VERB ...`` line of the README's Docker code block, as argv."""
    block = re.search(r"```sh\n(.*?)```", _docker_section(), flags=re.S)
    assert block, "the Docker section shows its commands in a sh block"
    (line,) = [ln for ln in block.group(1).splitlines() if ln.startswith(f"docker {verb} ")]
    return shlex.split(line)


def _options(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``docker run``'s options (each flag with its values) and its other arguments."""
    takes_value = {"-p", "--publish", "-v", "--volume", "--name", "-e", "--env", "-t", "--tag"}
    options: dict[str, list[str]] = {}
    rest: list[str] = []
    args = iter(argv[2:])
    for arg in args:
        if arg in takes_value:
            options.setdefault(arg, []).append(next(args))
        elif arg.startswith("-"):
            options.setdefault(arg, [])
        else:
            rest.append(arg)
    return options, rest


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out += pattern[i : close + 1]
            i = close + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it wins;
    ``!`` takes a path back in."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


# -- without a daemon: the build context and the documented commands -----------------------


def test_dockerignore_leaves_out_the_virtualenv_git_and_local_data() -> None:
    patterns = _dockerignore_patterns()

    for path in [
        ".venv/lib/python3.11/site-packages/httpx/__init__.py",
        ".git/objects/pack/pack-1.pack",
        "var/clusterfeed.sqlite3",
        "var/public/feed.atom",
        "var/mail/new/1.eml",
        "src/clusterfeed/__pycache__/cli.cpython-311.pyc",
        "config/clusterfeed.sqlite3",
    ]:
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    patterns = _dockerignore_patterns()
    sources = []
    for name, args in _instructions():
        if name == "COPY":
            *srcs, _dest = shlex.split(args)
            sources.extend(s for s in srcs if not s.startswith("--"))
    assert {"src", "templates", "config", "pyproject.toml"} <= set(sources)

    for source in sources:
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        tracked = [f for f in files if "__pycache__" not in f.parts]
        assert tracked, source
        for f in tracked:
            rel = f.relative_to(REPO).as_posix()
            assert not _ignored(rel, patterns), f"{rel} is copied but left out of the context"


def test_the_readme_docker_commands_match_the_dockerfile() -> None:
    build_opts, build_rest = _options(_readme_command("build"))
    run_opts, run_rest = _options(_readme_command("run"))
    command = _exec_form("CMD")
    entrypoint = _exec_form("ENTRYPOINT")
    volumes = set(json.loads(_one("VOLUME")))
    exposed = _one("EXPOSE")

    (image,) = build_opts["-t"]
    assert build_rest == ["."]
    assert run_rest == [image], "docker run starts the image the build tagged"
    assert "-d" in run_opts
    # The port: published, exposed and listened on are the same one, on all addresses.
    (published,) = run_opts["-p"]
    assert published == f"{exposed}:{exposed}"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == exposed
    # Both volumes are mounted, and the config the image reads lies in one of them.
    assert {v.split(":")[1] for v in run_opts["-v"]} == volumes
    env = dict(re.findall(r"(\w+)=(\S+)", _one("ENV")))
    assert str(Path(env["CLUSTERFEED_CONFIG"]).parent) in volumes
    assert env["CLUSTERFEED_DATA"] in volumes
    # What the README says the image runs is what it runs.
    section = _docker_section()
    assert f"`{' '.join(command)}`" in section
    assert f"CLUSTERFEED_CONFIG={env['CLUSTERFEED_CONFIG']}" in section
    (name,) = run_opts["--name"]
    for executed in re.findall(r"docker exec (\S+)", section):
        assert executed == name
    # The entry point is the repository's script, installed where ENTRYPOINT names it.
    copies = [shlex.split(a) for n, a in _instructions() if n == "COPY"]
    assert ["scripts/docker-entrypoint", f"/usr/local/bin/{entrypoint[0]}"] in copies
    assert os.access(ENTRYPOINT_SCRIPT, os.X_OK)


# -- without a daemon: the entry point on this machine ------------------------------------


def _entry_env(volumes: Path) -> dict[str, str]:
    """The image's environment, with temporary folders standing in for its volumes."""
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERFEED_CONFIG"}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["CLUSTERFEED_CONFIG"] = str(volumes / "config" / "clusterfeed.toml")
    env["CLUSTERFEED_DATA"] = str(volumes / "data")
    return env


def _entry(volumes: Path, *command: str) -> subprocess.CompletedProcess[str]:
    (volumes / "config").mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["sh", str(ENTRYPOINT_SCRIPT), *command],
        cwd=volumes,
        env=_entry_env(volumes),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_entrypoint_writes_a_starter_config_into_an_empty_volume(tmp_path: Path) -> None:
    result = _entry(tmp_path, "clusterfeed", "run", "--once")

    assert result.returncode == 0, result.stderr
    assert "no config at" in result.stderr and "writing a starter config" in result.stderr
    config, data = tmp_path / "config", tmp_path / "data"
    assert (config / "clusterfeed.toml").is_file()
    assert (config / "templates" / "digest.html").is_file()
    assert "fetched 9 feeds: 47 new items, 0 failed" in result.stdout
    assert f"digest: 3 sent of 3 planned → {data / 'mail' / 'new'}" in result.stdout
    assert (data / "clusterfeed.sqlite3").is_file()
    assert len(list((data / "mail" / "new").iterdir())) == 3
    parsed = feedparser.parse((data / "public" / "feed.atom").read_bytes())
    assert len(parsed.entries) == EXAMPLE_STORIES
    assert not (config / "var").exists(), "data belongs in the data volume"


def test_entrypoint_leaves_an_existing_config_alone(tmp_path: Path) -> None:
    assert _entry(tmp_path, "true").returncode == 0
    config = tmp_path / "config" / "clusterfeed.toml"
    edited = config.read_text(encoding="utf-8").replace('"Your Cluster"', '"Elbe Cluster"')
    config.write_text(edited, encoding="utf-8")

    result = _entry(tmp_path, "clusterfeed", "check")

    assert result.returncode == 0, result.stderr
    assert "starter config" not in result.stderr
    assert config.read_text(encoding="utf-8") == edited


def test_entrypoint_passes_on_the_exit_code_of_the_command(tmp_path: Path) -> None:
    assert _entry(tmp_path, "true").returncode == 0
    (tmp_path / "config" / "clusterfeed.toml").write_text("[cluster\n", encoding="utf-8")

    result = _entry(tmp_path, "clusterfeed", "check")

    assert result.returncode == 1
    assert "TOML syntax error" in result.stderr


def test_run_host_and_port_belong_to_serve(tmp_path: Path) -> None:
    assert _entry(tmp_path, "true").returncode == 0

    result = _entry(tmp_path, "clusterfeed", "run", "--once", "--host", "0.0.0.0")

    assert result.returncode == 2
    assert "--host and --port are for the web server of `run --serve`" in result.stderr
    assert not (tmp_path / "data").exists(), "nothing was fetched"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_feed(url: str, process: subprocess.Popen[str] | None, timeout: float) -> bytes:
    """Poll until the served feed has every example story; fail (with no timing claim)
    only after a generous time without it."""
    deadline = time.monotonic() + timeout
    last = "nothing yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the service stopped with {process.returncode}")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                body = response.content
                if len(feedparser.parse(body).entries) == EXAMPLE_STORIES:
                    return body
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"{url} never served the example feed ({last})")


def test_the_image_command_serves_on_the_port_it_names_whatever_the_config_says(
    tmp_path: Path,
) -> None:
    """The image's ENTRYPOINT and CMD as they are, but on 127.0.0.1 and a free port:
    the config's own web.host (an address this machine cannot listen on) and web.port
    must not matter, as in a container whose config says 127.0.0.1."""
    assert _entry(tmp_path, "true").returncode == 0
    config = tmp_path / "config" / "clusterfeed.toml"
    text = config.read_text(encoding="utf-8")
    text = text.replace('host = "127.0.0.1"', 'host = "192.0.2.1"')
    config.write_text(text.replace("port = 8080", f"port = {_free_port()}"), encoding="utf-8")
    port = _free_port()
    command = _exec_form("CMD")
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)

    process = subprocess.Popen(
        ["sh", str(ENTRYPOINT_SCRIPT), *command],
        cwd=tmp_path,
        env=_entry_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = _wait_for_feed(f"http://127.0.0.1:{port}/feed.atom", process, timeout=120)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert feedparser.parse(body).feed.title == "Your Cluster – news from our partners"
    assert process.returncode == 0, stderr


# -- with a daemon: the image itself ------------------------------------------------------


def _no_daemon() -> str | None:
    """Why the image cannot be built and run here, or None when it can."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        return info.stderr.strip().splitlines()[-1] if info.stderr.strip() else "docker info failed"
    return None


@pytest.fixture
def docker_names() -> Iterator[dict[str, str]]:
    """Names of this test's own image, container and volumes, removed afterwards."""
    tag = uuid.uuid4().hex[:10]
    names = {
        "image": f"clusterfeed-test:{tag}",
        "container": f"clusterfeed-test-{tag}",
        "config": f"clusterfeed-test-config-{tag}",
        "data": f"clusterfeed-test-data-{tag}",
    }
    yield names
    for cleanup in (
        ["docker", "rm", "-f", names["container"]],
        ["docker", "volume", "rm", names["config"], names["data"]],
        ["docker", "rmi", names["image"]],
    ):
        subprocess.run(cleanup, capture_output=True, timeout=120)


def test_the_image_runs_the_readme_command_and_serves_the_example_feed(
    docker_names: dict[str, str],
) -> None:
    """Needs a Docker daemon, and the base image and PyPI reachable for the build."""
    reason = _no_daemon()
    if reason:
        pytest.skip(f"no Docker daemon: {reason}")
    build = _readme_command("build")
    build[build.index("-t") + 1] = docker_names["image"]
    built = subprocess.run(build, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]

    # The README's command, with this test's own names and a free port on 127.0.0.1.
    run = _readme_command("run")
    opts, _ = _options(run)
    swaps = {
        opts["--name"][0]: docker_names["container"],
        opts["-p"][0]: "127.0.0.1::" + opts["-p"][0].split(":")[-1],
    }
    for volume in opts["-v"]:
        _source, target = volume.split(":")
        swaps[volume] = f"{docker_names[target.strip('/')]}:{target}"
    run = [swaps.get(arg, arg) for arg in run]
    run[-1] = docker_names["image"]
    started = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr

    mapped = subprocess.run(
        ["docker", "port", docker_names["container"], opts["-p"][0].split(":")[-1]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()[0]
    try:
        body = _wait_for_feed(f"http://{mapped}/feed.atom", None, timeout=300)
    except BaseException:
        logs = subprocess.run(
            ["docker", "logs", docker_names["container"]], capture_output=True, text=True
        )
        print(logs.stdout, logs.stderr)
        raise
    assert feedparser.parse(body).feed.title == "Your Cluster – news from our partners"
    checked = subprocess.run(
        ["docker", "exec", docker_names["container"], "clusterfeed", "check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    assert "/config/clusterfeed.toml: OK" in checked.stdout
