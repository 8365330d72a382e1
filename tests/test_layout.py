"""The package's shape, read from its source with ast (nothing is imported): no import cycle between
jaxmath's modules, nothing under jaxmath/ outside jaxmath/bench/ imports jaxmath.bench (the benchmarks
sit on top of the library, never under it), and the entry point stays thin.

Every import counts, at module level or inside a function: a lazy import that closes a cycle still
ties the two modules' designs together."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module in the package (a package by its __init__)."""
    out = {}
    for directory, _, files in os.walk(os.path.join(REPO, "jaxmath")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the jaxmath modules it imports}; `from jaxmath.x import y` names jaxmath.x.y where that
    is a module, else jaxmath.x."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
        targets = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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


def bench_importers(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """{module outside jaxmath.bench: the jaxmath.bench modules it imports}, for those that import any."""
    def in_bench(name):
        return name == "jaxmath.bench" or name.startswith("jaxmath.bench.")

    return {name: sorted(filter(in_bench, targets)) for name, targets in graph.items()
            if not in_bench(name) and any(map(in_bench, targets))}


def test_the_checks_find_a_cycle_and_a_bench_import():
    """The walk itself, on made-up graphs and on edges known to exist (so an empty answer below means
    something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert bench_importers({"jaxmath.main": {"jaxmath.bench.memory"}, "jaxmath.bench.memory": {"jaxmath.main"}}) \
        == {"jaxmath.main": ["jaxmath.bench.memory"]}
    graph = import_graph()
    assert "jaxmath.aot.run" in graph["jaxmath.aot.device"] and "jaxmath.aot.run" in graph["jaxmath.bench.memory"]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_nothing_outside_bench_imports_bench():
    assert bench_importers(import_graph()) == {}


def test_the_entry_point_is_thin():
    """main.py only hands over to the command line; each part of the run has its own module."""
    graph = import_graph()
    assert graph["jaxmath.main"] == {"jaxmath.cli"}
    with open(os.path.join(REPO, "jaxmath", "main.py"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) < 30
    for part in ("jaxmath.cli", "jaxmath.validate", "jaxmath.workdir", "jaxmath.sections", "jaxmath.runs",
                 "jaxmath.aot.device"):
        with open(_modules()[part], encoding="utf-8") as f:
            assert len(f.read().splitlines()) < 400, part


def test_the_checkpoint_code_is_in_parts_a_reader_can_hold():
    """jaxmath.checkpoint: the step's format, its digests, the fallback, the orbax calls, the manager
    that joins them and the standalone pytrees, each its own module of a few hundred lines."""
    parts = ("format", "digests", "fallback", "orbax_io", "manager", "pytree")
    modules = _modules()
    for part in parts:
        with open(modules[f"jaxmath.checkpoint.{part}"], encoding="utf-8") as f:
            assert len(f.read().splitlines()) < 300, part
    graph = import_graph()
    assert "jaxmath.checkpoint.manager" not in graph["jaxmath.checkpoint.format"]  # the layers point one way
    assert {f"jaxmath.checkpoint.{p}" for p in ("fallback", "orbax_io", "format", "digests")} <= \
        graph["jaxmath.checkpoint.manager"]
