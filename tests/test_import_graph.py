"""The import graph of the four packages, read from their source (every import statement,
also those inside functions): no cycles, and dependencies one way, model <- export <- service
<- loadtest, with the command line (``model.cli``, the composition root that registers every
package's commands) the one module allowed to look up."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "export", "service", "loadtest")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # a package may import lower layers only
CLI_ROOTS = {"model.cli", "model.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                while t and t not in modules:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name and t not in PACKAGES:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and graph["service.app"]  # the walk saw the tree
    assert cycles(graph) == []


def test_dependencies_point_one_way() -> None:
    upward = sorted(
        (m, t) for m, targets in import_graph().items() if m not in CLI_ROOTS
        for t in targets if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]])
    assert upward == []


BENCH_PACKAGES = ("model.bench", "export.bench")


def _is_bench(module: str) -> bool:
    return any(module == b or module.startswith(b + ".") for b in BENCH_PACKAGES) or (
        module.startswith("loadtest."))


def test_product_code_imports_no_benchmark() -> None:
    """Benchmarks (model.bench, export.bench, and the load tests) sit apart: no product module
    imports one; the command line only dispatches to them."""
    graph = import_graph()
    assert {"model.bench.quality", "export.bench.fusion", "model.bench.results"} <= set(graph)
    product = [m for m in graph if not _is_bench(m) and m not in CLI_ROOTS]
    assert sorted((m, t) for m in product for t in graph[m] if _is_bench(t)) == []
