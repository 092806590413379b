"""The package's modules import each other one way: the import graph, built from the sources with the imports
inside functions counted too, has no cycle."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "posefix"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: its file} of the package, the generated gRPC code left out."""
    out = {}
    for path in root.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: dict) -> list[tuple[str, bool]]:
    """The package's modules that module ``name`` imports, each with whether the import is inside a function.
    ``from a import b`` counts as importing ``a.b`` where that is a module, else ``a``; importing a module's
    own package (which Python runs first anyway) is not counted."""
    is_package = path.name == "__init__.py"
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".")
                    base = base[: len(base) - child.level + is_package]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in child.names]
            for target in targets:
                if target in known and target != name and not name.startswith(target + "."):
                    found.append((target, in_function))
            walk(child, inside)

    walk(ast.parse(path.read_text()), False)
    return found


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set]:
    known = modules(root)
    return {name: {t for t, _ in imported(name, path, known)} for name, path in known.items()}


def test_no_module_of_the_package_imports_itself_through_others():
    found = cycles(import_graph())
    assert not found, f"import cycles (imports inside functions included): {found}"


@pytest.mark.parametrize("sources, want", [
    ({"a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"}, [["pkg.a", "pkg.b"]]),
    ({"a.py": "from .b import y\n", "b.py": "import pkg.c\n", "c.py": "from pkg import a\n"},
     [["pkg.a", "pkg.b", "pkg.c"]]),
    ({"a.py": "from .b import y\n", "b.py": "x = 1\n", "sub/__init__.py": "from .. import a\n",
      "sub/m.py": "from . import n\n", "sub/n.py": "from ..a import z\n"}, []),
])
def test_the_graph_finds_a_cycle_hidden_in_a_function_and_none_where_there_is_none(tmp_path, sources, want):
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **sources}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert cycles(import_graph(root)) == want
