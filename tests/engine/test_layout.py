"""The house stays one-way: every module of trainer/, models/, data/ and slurm/ is parsed with `ast`, and
the test fails on an import circle (function-level imports count), on a function-level import of a
project module outside the CLI, on an import that goes up the layers of docs/layout.md, or on a folder of
more than 15 modules (tests/ and benchmarks/ included). The checker itself is tested on a small tree with
each fault."""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

import pytest

from trainer.config.catalog import REPO_ROOT as REPO

pytestmark = pytest.mark.quick

ROOTS = ("trainer", "models", "data", "slurm")
# Top to bottom; a module imports from its own unit or from units further down, never up, never sideways.
# One inner tuple is one unit (cli.py and the command modules are one: the command line).
LAYERS = (
    (("trainer.cli", "trainer.commands"),),
    (("slurm",),),
    (("trainer.workflows",),),
    (("trainer.tasks",),),
    (("trainer.parallel",), ("trainer.evaluation",)),
    (("trainer.engine",),),
    (("trainer.config",),),
    (("models",), ("data",)),
)
CLI = ("trainer.cli", "trainer.commands")  # may defer imports so that `rectok --help` stays fast
TOP_PACKAGES = ("trainer",)  # package markers only: nothing imports them, they import nothing
MAX_MODULES = 15


@dataclass
class Graph:
    modules: dict[str, str]  # dotted name -> file
    edges: dict[str, set[str]] = field(default_factory=dict)
    deferred: list[tuple[str, str, int]] = field(default_factory=list)  # (module, target, line) inside functions


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_modules(repo: str, roots=ROOTS) -> dict[str, str]:
    out = {}
    for root in roots:
        for parent, dirs, files in os.walk(os.path.join(repo, root)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(parent, f), repo)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(parent, f)
    return out


def _targets(module: str, is_package: bool, node, modules: dict[str, str]) -> list[str]:
    """The project modules an import statement reaches (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def build_graph(repo: str, roots=ROOTS) -> Graph:
    g = Graph(find_modules(repo, roots))
    for module, path in g.modules.items():
        tree = ast.parse(open(path).read(), path)
        is_package = path.endswith("__init__.py")
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        g.edges[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, is_package, node, g.modules):
                    if target != module:
                        g.edges[module].add(target)
                        if id(node) in inside:
                            g.deferred.append((module, target, node.lineno))
    return g


def cycles(g: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g.modules):
        if v not in index:
            visit(v)
    return found


def deferred_outside_cli(g: Graph, cli=CLI) -> list[tuple[str, str, int]]:
    return [d for d in g.deferred if not any(_within(d[0], c) for c in cli)]


def unit_of(module: str, layers=LAYERS) -> tuple[int, int] | None:
    """(layer, unit) of the longest prefix naming the module; None for a module in no layer."""
    best = None
    for i, layer in enumerate(layers):
        for j, unit in enumerate(layer):
            for prefix in unit:
                if _within(module, prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), (i, j))
    return best[1] if best else None


def upward_imports(g: Graph, layers=LAYERS, top_packages=TOP_PACKAGES) -> list[str]:
    bad = []
    for a, targets in g.edges.items():
        for b in targets:
            ua, ub = unit_of(a, layers), unit_of(b, layers)
            if b in top_packages:
                bad.append(f"{a} imports the bare package {b}")
            elif ua is not None and ub is not None and not (ua == ub or ub[0] > ua[0]):
                bad.append(f"{a} (layer {ua[0]}) imports {b} (layer {ub[0]})")
    return sorted(bad)


def unplaced(g: Graph, layers=LAYERS, top_packages=TOP_PACKAGES) -> list[str]:
    return sorted(m for m in g.modules if m not in top_packages and unit_of(m, layers) is None)


def crowded_folders(repo: str, roots=ROOTS, limit: int = MAX_MODULES) -> list[str]:
    out = []
    for root in roots:
        for parent, dirs, files in os.walk(os.path.join(repo, root)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            count = sum(f.endswith(".py") for f in files)
            if count > limit:
                out.append(f"{os.path.relpath(parent, repo)}: {count} modules")
    return out


# -- the project ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project() -> Graph:
    return build_graph(REPO)


def test_no_import_circles(project):
    assert cycles(project) == []


def test_no_function_level_project_imports_outside_the_cli(project):
    assert deferred_outside_cli(project) == []


def test_imports_run_down_the_layers(project):
    assert unplaced(project) == [], "a new package needs its place in LAYERS (and in docs/layout.md)"
    assert upward_imports(project) == []


def test_no_crowded_folders():
    assert crowded_folders(REPO, ROOTS + ("tests", "benchmarks", "scripts")) == []


def test_the_graph_sees_the_project(project):
    """A broken walker would pass every check above with nothing to check."""
    assert len(project.modules) > 60
    assert "trainer.engine.checkpoint" in project.edges["trainer.engine.loop"]
    assert "trainer.tasks.training" in project.edges["slurm.submit"]
    assert any(d[0] == "trainer.commands.train" for d in project.deferred)  # the CLI's deferred imports count


# -- the checker on trees with each fault ----------------------------------------------------------------

def _tree(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_checker_finds_each_fault(tmp_path):
    repo = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg import high\n",       # deferred, and closes a circle
        "pkg/high.py": "from .low import f\n",                        # up a layer
        "pkg/cli.py": "import pkg\n\ndef main():\n    from pkg.high import f\n",  # deferred in the CLI: allowed
        "pkg/side/__init__.py": "",
        "pkg/side/a.py": "from ..low import f\n",                     # sideways within a layer
        **{f"pkg/many/m{i}.py": "" for i in range(16)},
    })
    g = build_graph(repo, ("pkg",))
    assert cycles(g) == [["pkg.high", "pkg.low"]]
    assert deferred_outside_cli(g, ("pkg.cli",)) == [("pkg.low", "pkg.high", 2)]
    layers = ((("pkg.cli",),), (("pkg.low",), ("pkg.side",)), (("pkg.high",),))
    assert upward_imports(g, layers, ("pkg",)) == ["pkg.cli imports the bare package pkg",
                                                   "pkg.high (layer 2) imports pkg.low (layer 1)",
                                                   "pkg.side.a (layer 1) imports pkg.low (layer 1)"]
    assert unplaced(g, layers, ("pkg",)) == sorted(f"pkg.many.m{i}" for i in range(16))
    assert crowded_folders(repo, ("pkg",)) == ["pkg/many: 16 modules"]
