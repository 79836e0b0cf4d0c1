"""The package's module graph: every module imports, and no two modules import each other,
directly or through others, at the top or inside a function (a lazy import that closes a
cycle is a cycle all the same)."""
import ast
import importlib
import pkgutil
from pathlib import Path

import emloc
import emloc_kernels

PACKAGES = {"emloc": Path(emloc.__file__).parent, "emloc_kernels": Path(emloc_kernels.__file__).parent}


def module_files() -> dict:
    """{dotted module name: file} of every module of emloc and emloc_kernels (packages as their __init__)."""
    files = {}
    for root_name, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([root_name, *parts])] = path
    return files


def imported_modules(name: str, path: Path, known: set) -> set:
    """The project modules that module `name` imports anywhere in its body (relative imports
    resolved; `from pkg import sub` counts as importing pkg.sub when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def cycles(graph: dict) -> list:
    """Every cycle found by a depth-first search, as the list of modules along it."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_module_imports():
    for root_name, root in PACKAGES.items():
        for info in pkgutil.walk_packages([str(root)], f"{root_name}."):
            importlib.import_module(info.name)


def test_no_circular_imports():
    files = module_files()
    known = set(files)
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    graph = {name: {m for m in imported_modules(name, path, known)
                    if not (path.name == "__init__.py" and m.startswith(name + "."))}
             for name, path in files.items()}
    # importing a submodule runs its parents' __init__ first: not an edge the code chose
    assert len(graph) > 30
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
