"""hdlib's modules import each other without cycles.

The graph is read from the source with `ast`, so it sees every import statement:
module level and function-local (a local import only hides a cycle until the
function runs), `import hdlib.x`, `from . import x`, `from .x import y`,
`from ..x import y` and `from hdlib.x import y`. Subpackages count as modules
(`hdlib.stages.foo`). A package's own `__init__` is a node only when it is imported
explicitly: `from .x import y` loads hdlib/__init__ first but does not run it again,
so it is not an edge. A module importing itself is not a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of a package directory (package.__init__ is `package`)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported_modules(node, module: str, is_package: bool, modules) -> list[str]:
    """The package modules one import statement loads (names that are not modules map to
    the module they come from)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return [t for t in targets if t in modules]
    if node.level:  # relative: the containing package, then up level - 1 packages
        package = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 > len(package) - 1:
            raise ValueError(f"{module}: relative import beyond the top-level package")
        base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:  # `from pkg import submodule`
            out.append(f"{base}.{alias.name}")
        elif base in modules:  # `from pkg.mod import name`
            out.append(base)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: modules of the same package it imports anywhere in its source}."""
    files = module_files(root, package)
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported_modules(node, module, is_package, files))
        edges.discard(module)
        graph[module] = edges
    return graph


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node: the sets of modules
    that import each other in a circle (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] through each tangle's first node, sorted."""
    return sorted((_cycle_through(graph, comp) for comp in tangles(graph)), key=lambda c: c[0])


def _cycle_through(graph, component: set[str]) -> list[str]:
    """A shortest cycle inside `component` through its first node (breadth-first search)."""
    first = min(component)
    parent, frontier = {first: None}, [first]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == first:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [first]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {first} in {sorted(component)}")


# ---------------------------------------------------------------------------
# the checker itself, on synthetic graphs and a synthetic package
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, []),  # a diamond is no cycle
    ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a", "c"}},
     [["a", "b", "a"], ["c", "d", "e", "c"]]),
    ({"x": {"y"}, "y": {"z", "x"}, "z": {"y"}}, [["x", "y", "x"]]),  # one component, one cycle shown
])
def test_find_cycles_on_synthetic_graphs(graph, expected):
    assert find_cycles(graph) == expected


def test_find_cycles_on_a_long_chain_does_not_recurse():
    chain = {f"m{i:05d}": {f"m{i + 1:05d}"} for i in range(5000)}
    chain["m05000"] = set()
    assert find_cycles(chain) == []
    chain["m05000"] = {"m00000"}
    assert len(find_cycles(chain)[0]) == 5002


def test_import_graph_resolves_every_import_form(tmp_path):
    files = {
        "pkg/__init__.py": "VERSION = 1\n",
        "pkg/a.py": "from . import b\nfrom .c import thing\n",
        "pkg/b.py": "def f():\n    from pkg.c import thing  # function-local\n    import pkg.sub.d\n",
        "pkg/c.py": "import os\nfrom pkg import VERSION\nthing = 1\n",
        "pkg/sub/__init__.py": "from .d import g\n",
        "pkg/sub/d.py": "from .. import a\nfrom ..c import thing\nfrom . import e\n\ndef g():\n    pass\n",
        "pkg/sub/e.py": "from .d import g  # back to d\n",
        "pkg/other.py": "from pkg.sub import d, e\nfrom .other import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg.c"},
        "pkg.b": {"pkg.c", "pkg.sub.d"},
        "pkg.c": {"pkg"},
        "pkg.sub": {"pkg.sub.d"},
        "pkg.sub.d": {"pkg.a", "pkg.c", "pkg.sub.e"},
        "pkg.sub.e": {"pkg.sub.d"},
        "pkg.other": {"pkg.sub.d", "pkg.sub.e"},  # the self-import is dropped
    }
    assert tangles(graph) == [{"pkg.a", "pkg.b", "pkg.sub.d", "pkg.sub.e"}]
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.d", "pkg.a"]]


# ---------------------------------------------------------------------------
# hdlib
# ---------------------------------------------------------------------------

def test_hdlib_has_no_import_cycles():
    graph = import_graph(ROOT, "hdlib")
    assert {"hdlib.sampling.samplers", "hdlib.training.trainer"} <= set(graph)  # the walk found the package
    lines = []
    for cycle in find_cycles(graph):
        tangle = next(t for t in tangles(graph) if cycle[0] in t)
        others = sorted(tangle - set(cycle))
        lines.append("  " + " -> ".join(cycle) + (f"   (same tangle: {', '.join(others)})" if others else ""))
    assert not lines, "import cycles in hdlib:\n" + "\n".join(lines)
