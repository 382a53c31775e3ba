"""The package's plan: every module imports, and the imports among stepvideo_ms's own modules form no
circle (read from the source, lazy imports inside functions included), so dependencies point one way."""
from __future__ import annotations

import ast
import importlib
import pathlib
from typing import Dict, List, Set

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "stepvideo_ms"
NAME = "stepvideo_ms"


def module_files() -> Dict[str, pathlib.Path]:
    """Dotted module name -> its file, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path, modules: Set[str]) -> Set[str]:
    """The package's modules that `name` imports anywhere in its source (a package counts as its
    __init__; `from P import m` counts as importing module P.m when m is one)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[:len(here) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle or more."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    circles: List[List[str]] = []

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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_every_module_imports():
    for name in module_files():
        importlib.import_module(name)


def test_no_import_circle():
    files = module_files()
    circles = find_circles(import_graph())
    report = ["  " + " <-> ".join(str(files[m].relative_to(PACKAGE.parent)) for m in c) for c in circles]
    assert not circles, "import circles among stepvideo_ms modules:\n" + "\n".join(report)


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_circles(graph) == [["a", "b", "c"]]
    assert find_circles({"a": {"b"}, "b": set()}) == []


def test_lazy_and_relative_imports_are_read(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py"):
        (pkg / f).write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    from ..sub import b\n")
    mods = {"p", "p.a", "p.sub", "p.sub.b"}
    assert imports_of("p.sub.b", pkg / "sub" / "b.py", mods) == {"p.a"}


def test_the_root_holds_only_the_base_and_the_public_face():
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    # the public face, the base every room uses, and three two-line shims of the old -m spellings
    assert root == ["__init__", "__main__", "capabilities", "console", "describe", "runtime", "tiny", "verify", "versions",
                    "video"]


def test_the_lower_rooms_import_nothing_from_the_job_front():
    """serving/ (the caption and VAE servers) and diffusion/ (one video in one process) sit below
    generation/ (the msrun job front): an import from there would run back up the house."""
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if a.split(".")[1:2] in (["serving"], ["diffusion"]) and b.startswith(f"{NAME}.generation"))
    assert not upward, "imports from generation/ in a room below it:\n  " + "\n  ".join(upward)
