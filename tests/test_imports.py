"""The package's import graph: dependencies point one way (flows -> storage -> sae), with no cycle,
not even one hidden by an import inside a function; every module imports alone in a fresh
interpreter; no module reaches into another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sae", "storage", "flows")
LAYER = {"sae": 0, "storage": 1, "flows": 2}  # a module may import its own layer and those below


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(name: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import anywhere in the module (inside functions too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def project_edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import mod` counts as pkg.mod)."""
    mods = modules()
    edges = {}
    for name, tree in mods.items():
        targets = set()
        for module, names in imports(name, tree):
            if module.split(".")[0] not in PACKAGES:
                continue
            submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in mods}
            # `from pkg import sub` loads pkg's __init__ as any import of pkg.x does: an edge to sub alone
            targets |= submodules if names and len(submodules) == len(names) else {module} | submodules
        edges[name] = {t for t in targets if t in mods and t != name}
    return edges


def test_no_import_cycle_even_inside_functions():
    edges = project_edges()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_dependencies_point_one_way():
    wrong = [
        f"{a} imports {b}"
        for a, targets in project_edges().items()
        for b in targets
        if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_module_uses_another_modules_private_names():
    found = []
    for name, tree in modules().items():
        for module, names in imports(name, tree):
            if module.split(".")[0] in PACKAGES and module != name:
                found += [f"{name}: from {module} import {n}" for n in names if n.startswith("_")]
        aliases = {
            alias.asname or alias.name: node.module + "." + alias.name
            if isinstance(node, ast.ImportFrom)
            else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
            if isinstance(node, ast.Import) or node.module
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                target = aliases[node.value.id]
                if target.split(".")[0] in PACKAGES and target != name:
                    found.append(f"{name}: {node.value.id}.{node.attr}")
    assert not found, found


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = [n for n in modules() if not n.endswith("__main__")]

    def load(name: str) -> str | None:
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        return None if done.returncode == 0 else f"{name}: {done.stderr.strip().splitlines()[-1]}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(load, names) if f]
    assert not failures, failures
