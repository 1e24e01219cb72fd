"""The shape of rescoin/ (issue 9): short modules and functions, no import cycles, imports one way.

Read with ``ast``, nothing is imported. Imports inside functions and under
``if TYPE_CHECKING:`` count like the others: a dependency is a dependency.
The direction rules are the layering in docs/architecture.md: the decision core
imports only itself (and the Host protocol), hosts import the core, operations
import the core and hosts (and offline's history writer and trace reader),
offline work imports the core and the simulated host, and only the entry points
import the CLI.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rescoin"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

#: modules allowed over MAX_MODULE_LINES, each with the reason (path relative to the repository)
LONG_MODULES: dict[str, str] = {
    "rescoin/guest_agent/rescoin_agent.py":
        "deployed into guests as one standard-library file (no package, Python 3.6+); splitting it "
        "would mean shipping and versioning several files per guest",
}
#: functions allowed over MAX_FUNCTION_LINES ("path::Qual.name"), each with the reason
LONG_FUNCTIONS: dict[str, str] = {}

#: room -> (rooms it must not import, modules of those rooms it may import nonetheless)
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "core": ({"hosts", "ops", "offline", "cli", "lab", "cluster", "view"}, {"rescoin.hosts.base"}),
    "hosts": ({"ops", "offline", "cli", "lab"}, set()),
    # the daemon writes history, and replays a trace on a sim: URI; nothing else offline
    "ops": ({"offline", "cli", "lab"}, {"rescoin.offline.historycsv", "rescoin.offline.traces"}),
    "offline": ({"hosts", "ops", "cli", "lab"}, {"rescoin.hosts.base", "rescoin.hosts.sim", "rescoin.hosts.simmemory"}),
}
#: the only modules that may import the CLI: the CLI itself and ``python -m rescoin``
CLI_IMPORTERS = {"rescoin.__main__"}
ROOMS = {"core", "hosts", "ops", "offline", "cli", "lab", "cluster", "view"}



# --- reading the package ------------------------------------------------------------------


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package`` (a package's name is its ``__init__``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that the import statements anywhere in one module name, relative ones resolved.

    ``from X import n`` names the module ``X.n`` if there is one, else ``X``; ``import X.Y`` names the most
    specific of ``X.Y``, ``X`` that is a module of the package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in mods else resolve(source))
    return {m for m in found if m is not None and m != name}


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    mods = modules(package)
    return {name: _imported(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, as closed paths (each cycle once).

    Modules on cycles are the strongly connected components of more than one module (Tarjan).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out: dict[frozenset[tuple[str, str]], list[str]] = {}
    for comp in components:
        for start in sorted(comp) if len(comp) > 1 else ():
            path = _closed_path(graph, comp, start)
            out.setdefault(frozenset(zip(path, path[1:], strict=False)), path)
    return sorted(out.values())


def _closed_path(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """The shortest path from ``start`` back to itself inside its strongly connected component."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"not a cycle: {sorted(comp)}")


def room(module: str) -> str:
    """``rescoin.ROOM.…`` -> ROOM for the rooms in ROOMS (``rescoin.lab`` and ``rescoin.view`` too), else ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else ""


def _within(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def direction_breaks(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import that runs against FORBIDDEN or CLI_IMPORTERS."""
    out = []
    for importer, imported in sorted(graph.items()):
        forbidden, exceptions = FORBIDDEN.get(room(importer), (set(), set()))
        for m in sorted(imported):
            against_layers = room(m) in forbidden and not _within(m, exceptions)
            into_cli = room(m) == "cli" and room(importer) != "cli" and importer not in CLI_IMPORTERS
            if against_layers or into_cli:
                out.append(f"{importer} -> {m}")
    return out


def long_functions(path: Path) -> dict[str, int]:
    """``Qual.name`` -> lines (``def`` to last line) of every function and method over MAX_FUNCTION_LINES."""
    out = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                qual = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out[qual] = lines
                walk(child, qual + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(), str(path)), "")
    return out


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


@functools.cache
def _graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def _module_lines() -> dict[str, int]:
    return {_rel(p): len(p.read_text().splitlines()) for p in modules(PACKAGE).values()}


def _function_lines() -> dict[str, int]:
    return {f"{_rel(p)}::{q}": n for p in modules(PACKAGE).values() for q, n in long_functions(p).items()}


# --- the shape of rescoin/ ----------------------------------------------------------------


def test_no_module_over_500_lines():
    long = {m: n for m, n in _module_lines().items() if n > MAX_MODULE_LINES and m not in LONG_MODULES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_60_lines():
    long = {f: n for f, n in _function_lines().items() if f not in LONG_FUNCTIONS}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_allowed_exception_is_still_needed():
    """An entry whose module or function shrank (or went) must leave the allow-list."""
    lines, funcs = _module_lines(), _function_lines()
    stale = [m for m in LONG_MODULES if lines.get(m, 0) <= MAX_MODULE_LINES]
    stale += [f for f in LONG_FUNCTIONS if f not in funcs]
    assert not stale, f"allowed but no longer long: {stale}"


def test_no_import_cycles():
    found = cycles(_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_core_imports_only_itself_and_the_host_protocol():
    breaks = [b for b in direction_breaks(_graph()) if room(b.split(" -> ")[0]) == "core"]
    assert not breaks, "the decision core imports outside itself:\n" + "\n".join(breaks)


def test_imports_run_one_way():
    breaks = direction_breaks(_graph())
    assert not breaks, "imports against the layering:\n" + "\n".join(breaks)


# --- the checks above can fail ------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "rescoin" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "rescoin"


def test_graph_resolves_relative_and_function_level_imports(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "from .model import Thing\n",
        "core/model.py": "import numpy\nfrom . import arrays\n",
        "core/arrays.py": "def f():\n    from ..ops import daemon\n",
        "ops/__init__.py": "",
        "ops/daemon.py": "from rescoin.core.model import Thing\nimport rescoin.cli\n",
        "cli/__init__.py": "from ..core import model as m\n",
    })
    graph = import_graph(pkg)
    assert graph["rescoin.core"] == {"rescoin.core.model"}
    assert graph["rescoin.core.model"] == {"rescoin.core.arrays"}
    assert graph["rescoin.core.arrays"] == {"rescoin.ops.daemon"}
    assert graph["rescoin.ops.daemon"] == {"rescoin.core.model", "rescoin.cli"}
    assert graph["rescoin.cli"] == {"rescoin.core.model"}


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from rescoin import b\n",
        "b.py": "def later():\n    from rescoin.c import x\n",
        "c.py": "import rescoin.a\n",
        "d.py": "import rescoin.a\n",
    })
    assert cycles(import_graph(pkg)) == [["rescoin.a", "rescoin.b", "rescoin.c", "rescoin.a"]]


def test_every_cycle_of_a_tangle_is_named():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "a"], ["c", "b", "c"]]


def test_direction_breaks_name_each_import_against_the_layering():
    graph = {
        "rescoin.core.loop": {"rescoin.hosts.base", "rescoin.hosts.sim", "rescoin.shipped"},
        "rescoin.offline.fit": {"rescoin.cli", "rescoin.hosts.sim", "rescoin.ops.paths"},
        "rescoin.ops.daemon": {"rescoin.offline.historycsv", "rescoin.offline.traces", "rescoin.offline.fit"},
        "rescoin.__main__": {"rescoin.cli"},
        "rescoin.cli.argtypes": {"rescoin.cli"},
    }
    assert direction_breaks(graph) == [
        "rescoin.core.loop -> rescoin.hosts.sim",
        "rescoin.offline.fit -> rescoin.cli",
        "rescoin.offline.fit -> rescoin.ops.paths",
        "rescoin.ops.daemon -> rescoin.offline.fit",
    ]


def test_long_functions_counts_methods_and_nested_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "m.py"
    path.write_text(f"class C:\n  def long(self):\n{body}\n  def short(self):\n    pass\n"
                    f"def outer():\n  def inner():\n{body}\n")
    assert long_functions(path) == {"C.long": MAX_FUNCTION_LINES + 1, "outer": MAX_FUNCTION_LINES + 2,
                                    "outer.inner": MAX_FUNCTION_LINES + 1}
