"""The import graph (docs/architecture.md): every import points down the layers, siblings
(methods and certifiers; nn and data) never import each other, and no module-level import
circle exists. Read from the source with ``ast``: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "certnet"
#: (rank, group) of each top-level module or package of certnet; an import must go to a lower
#: rank, or stay inside its own group
LAYERS = {
    **dict.fromkeys(["errors", "floats", "registry", "schema", "timing", "memory", "device",
                     "threads", "distributed", "optim", "schedules", "threat", "certificate",
                     "properties", "files"],
                    (0, "foundation")),
    "nn": (1, "nn"), "data": (1, "data"),
    "graph": (2, "graph"),
    "bounds": (3, "bounds"), "archs": (3, "archs"), "verify": (3, "verify"),
    "attacks": (4, "attacks"), "falsify": (4, "attacks"),
    "methods": (5, "methods"), "certifiers": (5, "certifiers"),
    **dict.fromkeys(["config", "checkpoint", "certify", "audit", "train", "tblog", "zoo",
                     "decide", "any_model", "export"],
                    (6, "engine")),
    "cli": (7, "cli"), "__init__": (8, "api"),
}
#: the one sideways import: ``CertifiedModel.certify``, sugar over ``certnet.certifiers``
#: that nothing inside the package calls, resolves the registry when called
SUGAR = {("methods.base", "certifiers")}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """certnet modules imported at module level and inside functions (relative names)."""
    tree = ast.parse(path.read_text())
    top, lazy = set(), set()
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("certnet"):
            base = node.module.removeprefix("certnet").lstrip(".")
            subs = {f"{base}.{a.name}".lstrip(".") for a in node.names} & set(modules)
            found = subs or {base}
        elif isinstance(node, ast.Import):
            found = {a.name.removeprefix("certnet").lstrip(".") for a in node.names
                     if a.name.startswith("certnet")}
        else:
            continue
        (top if id(node) in module_level else lazy).update(found)
    return top, lazy


def _layer(module: str) -> tuple[int, str]:
    return LAYERS[module.split(".")[0] or "__init__"]


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    missing = [m for m in graph if m.split(".")[0] not in LAYERS and m != ""]
    assert not missing, f"add to LAYERS: {missing}"


def test_imports_point_down_and_siblings_stay_apart(graph):
    wrong = []
    for module, (top, lazy) in graph.items():
        rank, group = _layer(module)
        for target in top | lazy:
            if target == "":
                continue
            their_rank, their_group = _layer(target)
            if their_rank < rank or their_group == group:
                continue
            if (module, target.split(".")[0]) not in SUGAR:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_circle(graph):
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module):], module]))
        if module in done or module not in graph:
            return
        for target in graph[module][0]:
            visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
