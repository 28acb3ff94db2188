"""The package's import structure: every module imports on its own, the import graph has no
cycle, pure cores import no I/O, and only the node, the CLI and the demo import the node.

The graph is read from the source (AST), so a function-local import counts as much as a
module-level one; imports under `if TYPE_CHECKING:` do not (they never run). Importing
`a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so an import also depends on each
package above its target that is not already a package of the importer: that is how
`inference.backend -> artifacts.signature` closes a cycle through `artifacts/__init__.py`.

The lists below are what to edit when the layout changes.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import mesh

PACKAGE_ROOT = Path(mesh.__file__).parent

# Pure cores (DESIGN.md): no sockets, clocks, threads or asyncio, and nothing of the node.
# Patterns over module names; each must name at least one module.
PURE_CORES = (
    "mesh.membership.core",
    "mesh.transfer.scheduler",
    "mesh.transfer.retention",
    "mesh.guard.*",
    "mesh.artifacts.manifest",
    "mesh.artifacts.signature",
    "mesh.consensus.commands",
    "mesh.consensus.ledger",
    "mesh.consensus.planning",
    "mesh.consensus.premises",
    "mesh.consensus.wire",
    "mesh.consensus.safe_pickle",
    "mesh.inference.counts",
    "mesh.rollout.*",
)
# Cores being built elsewhere: checked once they exist.
PURE_CORES_WHEN_PRESENT = (
    "mesh.rollout.*",
)
FORBIDDEN_IN_CORES = ("asyncio", "grpc", "socket", "threading", "time", "mesh.node")

# Who may import the node runtime (mesh.node and below): the node itself, the CLI, the demo.
NODE_IMPORTERS = ("mesh.node", "mesh.cli", "mesh.demo")

# Known import edges that break the rules, in files this test's author does not own.
# To be removed by the runtime refactor.
ALLOWED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()
ALLOWED_CORE_IMPORTS = frozenset({
    # The audit log's file writer (a lock, the wall clock) shares a module with the pure record
    # chain the ledger reads; to be removed by the runtime refactor (the writer moves to a shell).
    ("mesh.guard.audit", "threading"),
    ("mesh.guard.audit", "time"),
})

# Not imported in isolation: running it is running the CLI.
NOT_IMPORTABLE = frozenset({"mesh.__main__"})


# --- reading the graph ---------------------------------------------------------------------


def package_modules(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Module name -> source file of every module under `root` (packages by their __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, *, is_package: bool, known: Iterable[str]) -> set[str]:
    """Every name `module` imports, as dotted names: a submodule when `from a import b` names one of
    `known`, else the module imported from. Module-level and function-local; not TYPE_CHECKING ones."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            if source_module != "__future__":
                for alias in node.names:
                    sub = f"{source_module}.{alias.name}"
                    found.add(sub if sub in known else source_module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _owning_module(name: str, known: set[str]) -> str | None:
    """The module a dotted import name lands in (`a.b.C` -> `a.b`), None outside `known`."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> what it imports: modules of the package (with the packages above them that
    importing runs first) and outside names as written. `sources`: module -> (source, is_package)."""
    known = set(sources)
    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        own_packages = {module.rsplit(".", n)[0] for n in range(module.count(".") + 1)}
        edges: set[str] = set()
        for name in imports_of(source, module, is_package=is_package, known=known):
            target = _owning_module(name, known)
            if target is None:
                edges.add(name)
                continue
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:depth])
                if ancestor in known and ancestor not in own_packages:
                    edges.add(ancestor)
        graph[module] = edges - {module}
    return graph


def mesh_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return import_graph({m: (p.read_text(), p.name == "__init__.py") for m, p in modules.items()})


# --- the checks (pure: fed a graph, so they can be shown to fail) -------------------------------


def cycles(graph: Mapping[str, set[str]],
           allowed: frozenset[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of modules, ignoring `allowed` edges."""
    edges = {m: sorted(t for t in targets if t in graph and (m, t) not in allowed)
             for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)  # recursion as deep as the longest import chain: a few dozen modules
    return [_cycle_through(min(group), group, edges) for group in groups]


def _cycle_through(start: str, group: set[str], edges: Mapping[str, list[str]]) -> list[str]:
    """A shortest cycle start -> ... -> start inside `group` (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while (before := previous[path[-1]]) is not None:
                        path.append(before)
                    return [*reversed(path), start]
                if w in group and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a cycle group but no cycle runs through it")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def core_modules(modules: Iterable[str], patterns: Iterable[str]) -> set[str]:
    return {m for m in modules for p in patterns if fnmatch.fnmatchcase(m, p)}


def impure_imports(graph: Mapping[str, set[str]], cores: Iterable[str], forbidden: Iterable[str],
                   allowed: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    """Each way a core reaches a forbidden import, directly or through modules of the package,
    as `core -> ... -> module -> forbidden`; `allowed` (module, import) pairs are skipped."""
    forbidden = tuple(forbidden)
    found = []
    for core in sorted(cores):
        paths = {core: [core]}
        todo = [core]
        while todo:
            module = todo.pop(0)
            for target in sorted(graph.get(module, ())):
                if (module, target) in allowed:
                    continue
                if any(_matches(target, f) for f in forbidden):
                    found.append(" -> ".join([*paths[module], target]))
                elif target in graph and target not in paths:
                    paths[target] = [*paths[module], target]
                    todo.append(target)
    return found


def node_imports(graph: Mapping[str, set[str]],
                 allowed_importers: Iterable[str]) -> list[tuple[str, str]]:
    """(importer, target) for every import of mesh.node by a module outside `allowed_importers`."""
    allowed_importers = tuple(allowed_importers)
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if _matches(t, "mesh.node") and not any(_matches(m, a) for a in allowed_importers))


# Imports each module given on the command line in a forked copy of a bare interpreter (nothing
# of the package loaded): a fresh interpreter per module, without paying its start-up each time.
_ISOLATED_IMPORTER = textwrap.dedent("""
    import importlib, os, sys, traceback
    failed = 0
    for name in sys.argv[1:]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(write_end, traceback.format_exc()[-3000:].encode())
                code = 1
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            error = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        if status:
            failed += 1
            print(f"--- import {name} failed:\\n{error}")
    sys.exit(1 if failed else 0)
""")


def import_each_alone(modules: Iterable[str], *, path: Path | None = None) -> subprocess.CompletedProcess:
    """Run the isolated importer over `modules` (with `path` first on sys.path, if given)."""
    env = None if path is None else {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run([sys.executable, "-c", _ISOLATED_IMPORTER, *modules], capture_output=True,
                          text=True, env=env, timeout=120)


# --- the package -------------------------------------------------------------------------------


def test_every_module_imports_on_its_own():
    modules = sorted(set(package_modules()) - NOT_IMPORTABLE)
    result = import_each_alone(modules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_import_graph_has_no_cycle():
    found = cycles(mesh_graph(), ALLOWED_CYCLE_EDGES)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_pure_cores_import_no_io_and_not_the_node():
    graph = mesh_graph()
    for pattern in PURE_CORES:
        assert core_modules(graph, [pattern]), f"{pattern} names no module: update PURE_CORES"
    cores = core_modules(graph, PURE_CORES + PURE_CORES_WHEN_PRESENT)
    found = impure_imports(graph, cores, FORBIDDEN_IN_CORES, ALLOWED_CORE_IMPORTS)
    assert not found, "pure cores reach I/O:\n" + "\n".join(found)


def test_only_the_node_the_cli_and_the_demo_import_the_node():
    found = node_imports(mesh_graph(), NODE_IMPORTERS)
    assert not found, "\n".join(f"{m} imports {t}" for m, t in found)


def test_allow_lists_name_edges_that_exist():
    """An allow-listed edge that is gone should leave the list, so the list stays a to-do list."""
    graph = mesh_graph()
    stale = [edge for edge in ALLOWED_CYCLE_EDGES | ALLOWED_CORE_IMPORTS
             if edge[1] not in graph.get(edge[0], ())]
    assert not stale, f"allow-listed imports that no longer exist: {stale}"


# --- the checks can fail -------------------------------------------------------------------------


def test_reading_imports_counts_local_ones_and_skips_type_checking_ones():
    source = textwrap.dedent("""
        from __future__ import annotations
        import json
        from typing import TYPE_CHECKING
        from . import sibling
        from .sub import thing
        from pkg.other import Name

        if TYPE_CHECKING:
            from pkg.heavy import Only
        else:
            import pkg.runtime_only

        def later():
            import grpc
            from pkg.lazy import helper
    """)
    known = {"pkg", "pkg.mod", "pkg.sibling", "pkg.sub", "pkg.other", "pkg.heavy", "pkg.runtime_only",
             "pkg.lazy"}
    found = imports_of(source, "pkg.mod", is_package=False, known=known)
    assert found == {"json", "typing", "pkg.sibling", "pkg.sub", "pkg.other", "pkg.runtime_only", "grpc",
                     "pkg.lazy"}


def test_importing_a_submodule_depends_on_the_packages_above_it():
    graph = import_graph({
        "app": ("", True),
        "app.lib": ("import app.lib.deep.leaf\n", True),  # runs app.lib.deep's __init__ first
        "app.lib.deep": ("", True),
        "app.lib.deep.leaf": ("import app.lib\n", False),  # its own packages are already running
    })
    assert graph["app.lib"] == {"app.lib.deep", "app.lib.deep.leaf"}
    assert graph["app.lib.deep.leaf"] == set()
    # A package whose __init__ imports a module that imports back into the package is a cycle.
    looped = import_graph({
        "a": ("from a.publish import publish\n", True),
        "a.publish": ("from b.backend import load\n", False),
        "a.signature": ("", False),
        "b": ("", True),
        "b.backend": ("from a.signature import Signature\n", False),
    })
    assert cycles(looped) == [["a", "a.publish", "b.backend", "a"]]


def test_cycles_are_found_and_allow_listed_edges_ignored():
    graph = {"m.a": {"m.b", "json"}, "m.b": {"m.c"}, "m.c": {"m.a"}, "m.d": {"m.a"}, "m.e": {"m.e"}}
    assert cycles(graph) == [["m.a", "m.b", "m.c", "m.a"], ["m.e", "m.e"]]
    assert cycles(graph, frozenset({("m.c", "m.a"), ("m.e", "m.e")})) == []
    assert cycles({"m.a": {"m.b"}, "m.b": set()}) == []


def test_impure_cores_are_found_directly_and_through_helpers():
    graph = {
        "m.core": {"m.helper", "hashlib"},
        "m.helper": {"m.io", "json"},
        "m.io": {"threading"},
        "m.clean": {"math", "timeit", "mesh.nodeish"},
        "m.timed": {"time"},
        "m.wired": {"mesh.node.runtime"},
    }
    found = impure_imports(graph, ["m.core", "m.clean", "m.timed", "m.wired"], FORBIDDEN_IN_CORES)
    assert found == ["m.core -> m.helper -> m.io -> threading", "m.timed -> time",
                     "m.wired -> mesh.node.runtime"]
    assert impure_imports(graph, ["m.core"], FORBIDDEN_IN_CORES, frozenset({("m.io", "threading")})) == []
    assert core_modules(["mesh.guard", "mesh.guard.core", "mesh.guardian"], ["mesh.guard.*"]) == \
        {"mesh.guard.core"}


def test_imports_of_the_node_from_elsewhere_are_found():
    graph = {
        "mesh.admin.client": {"mesh.node.runtime"},
        "mesh.cli.node": {"mesh.node.runtime"},
        "mesh.demo": {"mesh.node.local"},
        "mesh.node.runtime": {"mesh.node.config"},
        "mesh.nodes_report": {"mesh.nodesx"},
        "mesh.cliff": {"mesh.node"},
    }
    assert node_imports(graph, NODE_IMPORTERS) == [("mesh.admin.client", "mesh.node.runtime"),
                                                   ("mesh.cliff", "mesh.node")]


def test_each_module_is_imported_alone(tmp_path):
    """`user` works only after `setup` ran in the same interpreter: alone, it fails, as does a cycle."""
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "setup.py").write_text("import loop\nloop.CONFIG = {'x': 1}\n")
    (package / "user.py").write_text("import loop\nX = loop.CONFIG['x']\n")
    (package / "first.py").write_text("from loop.second import LATER\nFIRST = 1\n")
    (package / "second.py").write_text("from loop.first import FIRST\nLATER = 2\n")
    together = subprocess.run([sys.executable, "-c", "import loop.setup, loop.user"], cwd=tmp_path)
    assert together.returncode == 0
    result = import_each_alone(["loop.setup", "loop.user", "loop.first"], path=tmp_path)
    assert result.returncode == 1
    assert "import loop.user failed" in result.stdout and "AttributeError" in result.stdout
    assert "import loop.first failed" in result.stdout and "partially initialized module" in result.stdout
    assert "loop.setup failed" not in result.stdout
