"""The package layout: every module imports, no import cycles, arrows point down.

Imports are read with ast (function-level ones too: a lazy import is still a
dependency), so the check needs no root and loads nothing optional.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent.parent / "pytracer"

# package -> the pytracer packages it may import (besides itself and pytracer.format)
MAY_IMPORT = {
    "kernel": set(),
    "table": {"kernel"},
    "inventory": {"kernel", "table"},
    "leaks": {"kernel", "table", "inventory"},
    "views": {"kernel", "table", "inventory", "leaks"},
    "exporter": {"kernel", "table", "inventory", "leaks", "views"},
    "cli": {"kernel", "table", "inventory", "leaks", "views", "exporter"},
}
# The one upward arrow, by design: the pid filter is written by
# pytracer.table.writer (the only writer of the tracer's maps), and the
# backends fill it between load and attach.  Lazy imports only.
ALLOWED_UPWARD = {
    ("pytracer.kernel.core", "pytracer.table.writer"),
    ("pytracer.kernel.bcc", "pytracer.table.writer"),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str], top_level_only: bool = False) -> set[str]:
    """The pytracer modules ``name`` imports (``from pytracer.x import y``
    counts as pytracer.x.y when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pytracer"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            if not base.startswith("pytracer"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m != name and m in known}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_module_imports() -> None:
    for name in modules():
        if not name.endswith("__main__"):  # runs the CLI
            importlib.import_module(name)


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at-import", "with-lazy-imports"])
def test_no_import_cycles(top_level_only: bool) -> None:
    mods = modules()
    known = set(mods)
    graph = {n: imports_of(n, p, known, top_level_only) for n, p in mods.items()}
    # A package's __init__ is imported with each of its modules; the ones
    # here are empty or lazy, so edges into "pytracer" itself are not cycles.
    for deps in graph.values():
        deps.discard("pytracer")
    seen: dict[str, int] = {}  # 1: on the path, 2: done
    stack: list[str] = []

    def visit(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if seen.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in seen:
                visit(m)
        stack.pop()
        seen[n] = 2

    for n in sorted(graph):
        if n not in seen:
            visit(n)


def test_packages_only_import_downwards() -> None:
    mods = modules()
    known = set(mods)
    wrong = []
    for name, path in mods.items():
        pkg = package_of(name)
        if pkg not in MAY_IMPORT:
            continue
        for dep in sorted(imports_of(name, path, known)):
            dpkg = package_of(dep)
            if dpkg is None or dpkg == pkg or dep == "pytracer.format" or dpkg in MAY_IMPORT[pkg]:
                continue
            if (name, dep) not in ALLOWED_UPWARD:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_the_upward_arrow_is_lazy() -> None:
    """kernel -> table.writer must not be a module-level import (it would
    load the table layer with every kernel module)."""
    mods = modules()
    known = set(mods)
    for name, dep in ALLOWED_UPWARD:
        assert dep in imports_of(name, mods[name], known)
        assert dep not in imports_of(name, mods[name], known, top_level_only=True)


def test_inventory_readers_do_not_import_each_other() -> None:
    mods = modules()
    known = set(mods)
    assert "pytracer.inventory.fdscan" not in imports_of("pytracer.inventory.procs", mods["pytracer.inventory.procs"],
                                                         known)
    assert "pytracer.inventory.owners" not in imports_of("pytracer.inventory.fdscan",
                                                         mods["pytracer.inventory.fdscan"], known)


def test_public_names_resolve() -> None:
    import pytracer

    for name in pytracer._PUBLIC:
        assert getattr(pytracer, name) is not None, name
