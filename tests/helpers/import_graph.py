"""The import graph of a package, read from its source (every import, at module level or inside a function).

`python tests/helpers/import_graph.py [--rooms]` prints it as a Mermaid flowchart (modules, or rooms with
`--rooms`): the picture of docs/design.md. `tests/test_layout.py` checks its invariants.
"""
import ast
from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(package: str, root: Path = ROOT) -> dict[str, set[tuple[str, str]]]:
    """{module: {(imported module, imported name or "")}} for every module of `package` (names imported with
    `from X import name`; a submodule imported that way counts as the module)."""
    graph: dict[str, set[tuple[str, str]]] = {}
    for path in sorted((root / package).rglob("*.py")):
        name = module_name(path, root)
        is_package = path.name == "__init__.py"
        found: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {(alias.name, "") for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if (root / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                            (root / Path(*sub.split(".")) / "__init__.py").is_file():
                        found.add((sub, ""))
                    else:
                        found.add((target, alias.name))
        graph[name] = found
    return graph


def module_edges(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{module: {modules of `package` it imports}}, a package's `__init__` left out as a target (importing
    `a.b.c` runs `a/__init__` and `a/b/__init__`, which is not a dependency of the importer's design)."""
    graph = imports(package, root)
    return {m: {t for t, _ in found if t in graph and t != m and t != package} for m, found in graph.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str, package: str = "moshi_eval") -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else package


def mermaid(package: str = "moshi_eval", rooms: bool = True) -> str:
    edges = module_edges(package)
    lines = ["flowchart TD"]
    if rooms:
        pairs = sorted({(room(a), room(b)) for a, targets in edges.items() for b in targets if room(a) != room(b)})
    else:
        pairs = sorted((a, b) for a, targets in edges.items() for b in targets)
    lines += [f"    {a.replace('.', '_')}[{a}] --> {b.replace('.', '_')}[{b}]" for a, b in pairs]
    return "\n".join(lines)


if __name__ == "__main__":
    print(mermaid(rooms="--modules" not in sys.argv))
