"""The package's layout: which modules may import which.

config.py is read by every stage, so it must never need a stage back: an import
cycle through it (config -> digest -> config, as there was) makes the order modules
are first imported in decide whether a command starts at all, and hides the cycle
behind a function-level import. Imports inside functions count here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import clusterfeed

PACKAGE = Path(clusterfeed.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every clusterfeed module and the clusterfeed modules it imports, anywhere in it."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[_module_name(path)] = {m for m in found if m in modules}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def test_config_imports_nothing_that_imports_config_back() -> None:
    graph = _imports()
    assert "clusterfeed.config" in graph["clusterfeed.digest.render"]  # the graph sees imports
    back = sorted(
        m for m in graph["clusterfeed.config"] if "clusterfeed.config" in _reachable(graph, m) | {m}
    )
    assert back == [], f"config.py imports {back}, which import config.py again"


def test_the_package_data_is_found_from_its_new_home() -> None:
    from clusterfeed.resources import default_template_dir

    assert (default_template_dir() / "digest.html").is_file()


def _store_reaches(source: str, name: str) -> list[str]:
    """Every ``x.store`` read in a module, as ``name:line``: an attribute named ``store``
    anywhere in a chain (``service.store.count_stories()``, ``self.service.store``, or a
    bound method handed on, such as ``service.store.email_of``)."""
    return [
        f"{name}:{node.lineno}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "store"
    ]


def test_the_cli_and_the_web_app_never_reach_into_the_store() -> None:
    """The CLI and the web app read through ``service.queries`` and change through
    ``service.commands``: the store's shape can change behind the service without a
    command or a page having to follow it."""
    faces = [PACKAGE / "cli.py", *sorted((PACKAGE / "web").rglob("*.py"))]
    assert PACKAGE / "web" / "signup.py" in faces  # the web app's modules are found
    reaches = [
        hit for path in faces for hit in _store_reaches(path.read_text(encoding="utf-8"), path.name)
    ]
    assert reaches == [], f"call service.queries or service.commands instead: {reaches}"


def test_the_store_check_sees_each_kind_of_reach() -> None:
    """The check above is not blind: a call, a bound method handed on and a read
    through ``self`` are each found; the service's queries are not."""
    sample = (
        "def f(self, service):\n"
        "    service.queries.count_stories()\n"
        "    n = service.store.count_stories()\n"
        "    run(service.store.email_of)\n"
        "    store = self.service.store\n"
    )
    found = sorted(_store_reaches(sample, "sample.py"))
    assert found == ["sample.py:3", "sample.py:4", "sample.py:5"]


def test_the_cli_builds_a_store_only_to_hand_it_to_the_service() -> None:
    """``Store(...)`` appears in one function of cli.py, the one that builds the
    service; ``migrate`` and every other command go through ``clusterfeed.app``."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    builders = sorted(
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Store"
    )
    assert builders == ["_service"]
