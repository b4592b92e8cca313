"""No import circles among the ``minigpt4`` modules (issue 20).

Every ``import`` / ``from ... import`` of a module is an edge, including imports inside functions
(a lazy import still ties the two modules together); imports under ``if TYPE_CHECKING:`` are left
out (they never run). ``from package import name`` points at ``package.name`` when that is a
module, else at the package.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of a package folder."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:  # ``import a.b.c`` where c is a name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_circles_lazy_and_relative(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x  # lazy and relative\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}  # TYPE_CHECKING imports never run
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_circles_in_minigpt4():
    graph = import_graph(ROOT / "minigpt4")
    assert graph["minigpt4.models.minigpt_v2"] >= {"minigpt4.models.checkpoints"}  # the graph sees real imports
    assert cycles(graph) == []


def test_no_import_circles_in_preprocessing():
    graph = import_graph(ROOT / "preprocessing")
    # pipeline uses overlap and the output-folder rules, never the reverse (issue 20's split)
    assert graph["preprocessing.pipeline"] >= {"preprocessing.overlap", "preprocessing.output_folder"}
    assert cycles(graph) == []


# --- Layers (issue 24) ----------------------------------------------------------------------
# The layer order, declared once, top (imports anything below) to bottom (imports nothing of the
# project above it). A "unit" is a package folder of minigpt4 (``minigpt4.evaluation``), a
# top-level module of minigpt4 (``minigpt4.boxes``) or the ``preprocessing`` package as a whole.
# Units in one layer may import each other's modules but no two units may import each other.
LAYERS: list[set[str]] = [
    # the ``python -m minigpt4.export|inspect|quickstart`` modules are entry points: they call a command
    {"minigpt4.export", "minigpt4.inspect", "minigpt4.quickstart"},
    {"minigpt4.commands"},
    {"minigpt4.demo", "minigpt4.evaluation", "minigpt4.training"},
    {"minigpt4.scan_outputs"},
    {"minigpt4.inference", "minigpt4.drawing"},
    # provenance reads checkpoints' records and the prepared layout (models, data)
    {"minigpt4.provenance"},
    {"minigpt4.models", "minigpt4.memory"},
    {"minigpt4.data", "minigpt4.tokenizer"},
    # the preprocessing command and library (prepares the layout that data/ reads)
    {"preprocessing"},
    {"minigpt4", "minigpt4.config", "minigpt4.boxes", "minigpt4.prompts", "minigpt4.io", "minigpt4.outputs",
     "minigpt4.utils", "minigpt4.cli", "minigpt4.progress", "minigpt4.identity", "minigpt4.nifti_io",
     "minigpt4.distributed"},
]

PACKAGES = ("minigpt4", "preprocessing")


class Edge(NamedTuple):
    source: str
    target: str
    local: bool  # the import statement is inside a function


def unit_of(module: str) -> str:
    """``minigpt4.evaluation.tables`` → ``minigpt4.evaluation``; ``preprocessing.x`` → ``preprocessing``."""
    parts = module.split(".")
    if parts[0] != "minigpt4":
        return parts[0]
    return ".".join(parts[:2])


def layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise KeyError(f"{unit} is in no layer of tests/test_imports.py LAYERS: add it where it belongs")


def _imports_with_scope(tree: ast.AST):
    """``(node, inside_function)`` for every import node, leaving out ``if TYPE_CHECKING:``."""
    stack = [(tree, False)]
    while stack:
        node, local = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend((child, local) for child in node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
        inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def import_edges(root: Path = ROOT, packages=PACKAGES) -> list[Edge]:
    """Every import of a project module by a project module (across the packages), one per name."""
    modules: dict[str, Path] = {}
    for package in packages:
        modules.update(module_names(root / package))
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, local in _imports_with_scope(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.append(Edge(name, target, local))
    return edges


def layer_violations(edges: list[Edge]) -> tuple[list[str], list[str]]:
    """(imports from a lower layer to a higher one, unit pairs that import each other)."""
    upward = sorted({f"{e.source} -> {e.target}" + (" (in a function)" if e.local else "") for e in edges
                     if layer_of(unit_of(e.source)) > layer_of(unit_of(e.target))})
    unit_edges = {(unit_of(e.source), unit_of(e.target)) for e in edges}
    mutual = sorted(f"{a} <-> {b}" for a, b in unit_edges if a < b and (b, a) in unit_edges)
    return upward, mutual


def test_the_layer_checker_finds_upward_and_mutual_imports(tmp_path):
    for unit in ("minigpt4/models", "minigpt4/evaluation", "minigpt4/training"):
        (tmp_path / unit).mkdir(parents=True)
        (tmp_path / unit / "__init__.py").write_text("")
    (tmp_path / "minigpt4" / "__init__.py").write_text("")
    (tmp_path / "minigpt4" / "models" / "m.py").write_text("def f():\n    from minigpt4.evaluation import e\n")
    (tmp_path / "minigpt4" / "evaluation" / "e.py").write_text("from ..training import t\nfrom minigpt4.models.m import f\n")
    (tmp_path / "minigpt4" / "training" / "t.py").write_text("import minigpt4.evaluation.e\n")
    edges = import_edges(tmp_path, ("minigpt4",))
    assert Edge("minigpt4.models.m", "minigpt4.evaluation.e", True) in edges
    upward, mutual = layer_violations(edges)
    assert upward == ["minigpt4.models.m -> minigpt4.evaluation.e (in a function)"]
    assert mutual == ["minigpt4.evaluation <-> minigpt4.models", "minigpt4.evaluation <-> minigpt4.training"]


def test_every_import_runs_down_the_layers():
    edges = import_edges()
    assert len(edges) > 100  # the checker sees the real imports
    upward, mutual = layer_violations(edges)
    assert upward == [] and mutual == []
