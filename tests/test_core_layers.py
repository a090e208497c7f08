"""The library's layers: imports point downward only, no cycle, and only fedcca.flower loads Flower.

The import graph is read from the source (every ``import`` statement, including those inside
functions and under ``TYPE_CHECKING``), so a deferred or type-only import counts like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.tiny_dataset import ROOT

PACKAGE = Path(ROOT) / "fedcca"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedcca.devices", "fedcca.plotting", "fedcca.blas"),  # helpers that know nothing of models
    ("fedcca.spec",),  # the structure of a network as data
    ("fedcca.statistics", "fedcca.models", "fedcca.training", "fedcca.data"),
    ("fedcca.methods",),  # one module per merge method, and the registry
    ("fedcca.merging",),  # configuration, the Merger pipeline, BatchNorm, REPAIR, selection
    ("fedcca.flower",),  # the only importer of flwr
    ("fedcca.app",),  # this repository's own ClientApp/ServerApp code
    ("fedcca.cli",),
    ("fedcca",),  # the package's lazy public names
)
"""Lowest first: a module may import its own layer and the layers below it."""

FLOWER_LAYERS = ("fedcca.flower", "fedcca.app")
"""Where ``import flwr`` is allowed (the app layer builds on the Flower layer)."""


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fedcca modules and top-level packages ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the fedcca modules it imports (and ``flwr`` when it imports Flower)."""
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        targets = imports(name, path, known)
        graph[name] = {t for t in targets if t in known and t != name} | ({"flwr"} & {t.split(".")[0] for t in targets})
    return graph


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix naming ``module``."""
    best, rank = -1, None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank is None:
        raise AssertionError(f"module {module} is in no layer of LAYERS: add it where it belongs")
    return rank


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, and of flwr outside :data:`FLOWER_LAYERS`."""
    bad = []
    for source, targets in graph.items():
        for target in sorted(targets):
            if target == "flwr":
                if not any(source == p or source.startswith(p + ".") for p in FLOWER_LAYERS):
                    bad.append(f"{source} imports flwr")
            elif layer_of(target) > layer_of(source):
                bad.append(f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
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


def test_every_import_points_to_the_same_or_a_lower_layer() -> None:
    assert upward(import_graph()) == []


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_a_cycle_and_flower_in_the_core() -> None:
    """The two checks above can fail: fabricated edges of each kind are reported."""
    graph = {name: set(targets) for name, targets in import_graph().items()}
    graph["fedcca.spec.alignment"].add("fedcca.merging.config")
    graph["fedcca.merging.config"].add("fedcca.statistics")
    graph["fedcca.statistics"].add("fedcca.spec.alignment")
    graph["fedcca.statistics"].add("flwr")
    assert "fedcca.spec.alignment (layer 1) imports fedcca.merging.config (layer 4)" in upward(graph)
    assert "fedcca.statistics imports flwr" in upward(graph)
    assert any({"fedcca.merging.config", "fedcca.spec.alignment", "fedcca.statistics"} <= set(c) for c in cycles(graph))


def test_type_only_and_deferred_imports_are_seen(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedcca.merging.config import X\n"
                      "def f():\n    from fedcca.flower import strategy\n")
    found = imports("fedcca.spec.mod", source, {"fedcca.merging.config", "fedcca.flower.strategy"})
    assert {"fedcca.merging.config", "fedcca.flower.strategy"} <= found


def test_the_merge_library_does_not_import_flower() -> None:
    """Importing every core module and merging two models leaves flwr unloaded (checked at run time too)."""
    core = sorted(m for m in modules() if layer_of(m) < layer_of("fedcca.flower")) + ["fedcca.cli"]
    code = (f"import sys\nfor name in {core!r}:\n    __import__(name)\n"
            "import torch, fedcca\n"
            "from fedcca.models import build_model\n"
            "models = [build_model('lenet') for _ in range(2)]\n"
            "fedcca.merge(models, torch.randn(16, 1, 28, 28), 'cca')\n"
            "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
            "assert not loaded, loaded[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
