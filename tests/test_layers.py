"""Dependencies point downward: every import in quota_proxy stays in its layer or goes below it.

LAYERS lists the package bottom-up. A module may import modules of its own layer or of a
lower one, never of a higher one; the import graph has no cycles; and a leaf imports
nothing from the package at all. A module names its layer by its own name or by its
closest package (a new ``api.*`` module is an endpoint until it says otherwise). Every
module must have a layer, so a new one is placed on purpose.

Imports are read from the source with ast, including those inside functions and under
``if TYPE_CHECKING:`` — a lazy import that runs back up is still a dependency upward.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

PACKAGE = "quota_proxy"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LEAVES = "leaves"
LAYERS: Sequence[tuple[str, frozenset[str]]] = (
    # Import nothing from the package: the error tree, money, key format, records, pure helpers.
    (
        LEAVES,
        frozenset(
            {
                "errors", "money", "keys", "grants", "logs", "metrics", "sse", "tokens",
                "http_client", "store.models", "api.openapi", "store.dashboard_models", "usage",
                "fake_dialects", "payments", "payments.settings", "payments.codes", "payments.throttle",
                "store.writeback", "accept",
            }
        ),
    ),
    # Settings, the store, ASGI plumbing and the JSON shapes of records.
    (
        "core",
        frozenset(
            {"config", "asgi", "views", "state", "store", "store.sqlite", "store.dashboard_sqlite",
             "payments.stripe_events", "payments.views", "store.postgres", "store.protocol", "store.copy",
             "store.dashboard_postgres"}
        ),
    ),
    # Pure translators between Chat Completions and the agent APIs (errors and usage below).
    ("protocols", frozenset({"protocols"})),
    # One job each on the request path, the HTTP connection under it, and the fake upstream the demo serves.
    (
        "request path",
        frozenset(
            {"json_body", "inference_request", "holds", "context", "auth", "routing", "upstream", "fake_upstream",
             "http_protocol", "runner", "alerts", "payments.stripe_checkout", "payments.checkout"}
        ),
    ),
    ("metering", frozenset({"meter", "reply", "metering"})),
    # Operator actions (the CLI's backend) and what every endpoint shares.
    ("operations", frozenset({"admin", "api.common", "payments.admin"})),
    ("endpoints", frozenset({"api", "api.account", "api.funding", "api.ops", "api.usage", "agents"})),
    # The web dashboard: pages for people over the operations and endpoints below it.
    ("dashboard", frozenset({"dashboard"})),
    ("app", frozenset({"app"})),
    # Processes and kits: may import anything below.
    ("entry points", frozenset({"", "__main__", "cli", "serve", "demo", "testing", "testing_stripe"})),
)


def module_name(path: Path, root: Path) -> str:
    """'store.sqlite' for quota_proxy/store/sqlite.py; '' for the package's __init__."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, is_package: bool) -> set[str]:
    """The package modules one file imports (relative to the package root)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_local(alias.name) for alias in node.names if _is_local(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            if base is None:
                continue
            # `from quota_proxy import admin` depends on admin, not on the package's __init__.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(_local(candidate if _is_module(candidate) else base))
    found.discard(module)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module if node.module and _is_local(node.module) else None
    here = [PACKAGE, *filter(None, module.split("."))]
    if not is_package:
        here.pop()
    here = here[: len(here) - (node.level - 1)]
    return ".".join(here + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    path = ROOT.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _is_local(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _local(name: str) -> str:
    return name[len(PACKAGE) + 1 :] if name != PACKAGE else ""


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        graph[module] = imports_of(path, module, path.name == "__init__.py")
    return graph


def layer_of(module: str, layers: Sequence[tuple[str, frozenset[str]]]) -> int | None:
    """The layer that names the module, or failing that its closest enclosing package."""
    parts = module.split(".")
    # 'api.x.y', 'api.x', 'api' — never '' (the package root names only its own __init__).
    for name in [module] if not module else [".".join(parts[:n]) for n in range(len(parts), 0, -1)]:
        for index, (_, members) in enumerate(layers):
            if name in members:
                return index
    return None


def violations(
    graph: Mapping[str, set[str]], layers: Sequence[tuple[str, frozenset[str]]] = LAYERS
) -> list[str]:
    """Every import that breaks the rules, as a sentence naming both modules and layers."""
    problems: list[str] = []
    for module in sorted(graph):
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{_show(module)} has no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for target in sorted(graph[module]):
            theirs = layer_of(target, layers)
            if theirs is None:
                continue  # reported as its own module
            if layers[own][0] == LEAVES:
                problems.append(f"{_show(module)} is a leaf but imports {_show(target)}")
            elif theirs > own:
                problems.append(
                    f"{_show(module)} ({layers[own][0]}) imports {_show(target)}, "
                    f"which is higher up ({layers[theirs][0]})"
                )
    problems.extend(f"import cycle: {' -> '.join(map(_show, cycle))}" for cycle in cycles(graph))
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected knot of the graph (depth-first, iterative enough here)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _show(module: str) -> str:
    return f"{PACKAGE}.{module}" if module else PACKAGE


def test_every_import_points_down_the_layers() -> None:
    graph = import_graph()
    assert {"errors", "asgi", "app", "testing", "store.sqlite"} <= set(graph)  # the walk found the package
    assert violations(graph) == []


def test_the_seams_the_review_asked_for() -> None:
    graph = import_graph()
    assert graph["errors"] == set()
    assert not any(m == "api" or m.startswith("api.") for m in graph["admin"])
    assert "testing" not in graph["demo"]
    assert "runner" in graph["demo"] and "fake_upstream" in graph["demo"]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        (
            {"errors": {"asgi"}, "asgi": set()},
            ["quota_proxy.errors is a leaf but imports quota_proxy.asgi"],
        ),
        (
            {"admin": {"api.funding"}, "api.funding": set()},
            [
                "quota_proxy.admin (operations) imports quota_proxy.api.funding, "
                "which is higher up (endpoints)"
            ],
        ),
        (
            {"config": {"asgi"}, "asgi": {"config"}},
            ["import cycle: quota_proxy.asgi -> quota_proxy.config -> quota_proxy.asgi"],
        ),
        ({"api.new_dialect": {"metering"}, "metering": set()}, []),
        ({"gadget": set()}, ["quota_proxy.gadget has no layer: add it to LAYERS in tests/test_layers.py"]),
    ],
)
def test_the_checker_catches_what_it_should(graph: dict[str, set[str]], expected: list[str]) -> None:
    assert violations(graph) == expected


def test_relative_and_from_package_imports_are_read(tmp_path: Path) -> None:
    """`from . import x`, `from quota_proxy import x` and lazy imports inside functions all count."""
    source = (
        "from . import errors\n"
        "from quota_proxy import asgi, create_app\n"
        "def later():\n"
        "    import quota_proxy.app\n"
    )
    path = tmp_path / "metering.py"
    path.write_text(source)
    assert imports_of(path, "metering", is_package=False) == {"", "errors", "asgi", "app"}
