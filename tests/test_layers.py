"""The package's layers point one way: no import cycle in pocketllm/, and the core never imports
the benchmark harness (pocketllm.bench).

Read from the source (ast), not by importing: every import counts, module-level or inside a
function, since a deferred import hides a cycle rather than removing it."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pocketllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The pocketllm modules `name` imports. `from pkg import x` runs pkg/__init__ and, when x is a
    submodule, x too. A module's own enclosing packages are not edges: Python has loaded them
    before the module runs (and an __init__ importing its submodules is what a package does)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: strip level-1 packages off this module's package
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    enclosing = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in MODULES and m != name and m not in enclosing}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring the path)."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt):
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def test_graph_is_read():
    # guards the test itself: a resolver that found nothing would pass the cycle check vacuously
    assert "pocketllm.methods.base" in GRAPH["pocketllm.methods.zo_sgd"]
    assert "pocketllm.zo.noise" in GRAPH["pocketllm.zo.perturbations.dense"]
    assert "pocketllm.split.split_pb2" in GRAPH["pocketllm.split.split_pb2_grpc"]


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_does_not_import_bench():
    bad = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items()
                 if not name.startswith("pocketllm.bench")
                 for dep in deps if dep == "pocketllm.bench" or dep.startswith("pocketllm.bench."))
    assert not bad, "the core imports the benchmark harness: " + ", ".join(bad)
