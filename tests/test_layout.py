"""The package's shape, as docs/ARCHITECTURE.md states it, checked from the source.

* Core modules import only the core: never a backend, the layer, the bench or an
  integration.
* Backends import the core, ``backends.base`` and their own folder; the one crossing is
  the cuda backend using Triton's public surface (its package, ``experts``, ``backend``).
* No import cycle among the package's modules (function-level imports included).
* ``MOE_KERNELS_*`` environment variables are read in ``options.py`` only.
"""

from __future__ import annotations

import ast
import pathlib
import re

PKG = pathlib.Path(__file__).resolve().parents[1] / "moe_kernels"
CORE = {"_checks", "options", "limits", "activations", "params", "routing", "plan", "primitives", "segment_matmul",
        "cpu_kernel",
        "reference",
        "testing"}
BACKENDS = ("torch", "triton", "cuda")
TRITON_PUBLIC = {"moe_kernels.backends.triton", "moe_kernels.backends.triton.experts",
                 "moe_kernels.backends.triton.backend"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, top_level_only: bool) -> set[str]:
    """Package modules imported by module ``name`` (absolute names)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("moe_kernels"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moe_kernels"))
    return found


def test_core_imports_only_core():
    mods = _modules()
    for name, path in mods.items():
        leaf = name.split(".")[1] if name.count(".") == 1 else None
        if leaf not in CORE:
            continue
        for imp in _imports(name, path, top_level_only=False):
            if imp not in mods or imp == "moe_kernels":
                continue
            target = imp.split(".")[1]
            assert target in CORE, f"core module {name} imports {imp}"


def test_backends_do_not_reach_into_each_other():
    mods = _modules()
    for name, path in mods.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] != "backends" or parts[2] not in BACKENDS:
            continue
        own = parts[2]
        for imp in _imports(name, path, top_level_only=False):
            if imp not in mods:
                continue
            ip = imp.split(".")
            if len(ip) > 2 and ip[1] == "backends" and ip[2] in BACKENDS and ip[2] != own:
                allowed = own == "cuda" and ip[2] == "triton" and imp in TRITON_PUBLIC
                allowed |= own == "cuda" and imp == "moe_kernels.backends.torch.experts"
                assert allowed, f"{name} imports another backend's internals: {imp}"
            if len(ip) > 2 and ip[1] == "backends" and ip[2] == "registry":
                raise AssertionError(f"{name} goes through the registry: {imp}")


def test_no_import_cycles():
    mods = _modules()
    graph = {n: {i for i in _imports(n, p, top_level_only=False) if i in mods and i != n} for n, p in mods.items()}
    # A package's __init__ importing its own submodules is not a cycle of interest: drop
    # edges from a submodule to its ancestor packages (Python resolves those first).
    for n in graph:
        graph[n] = {i for i in graph[n] if not n.startswith(i + ".")}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_environment_read_in_options_only():
    pattern = re.compile(r"environ(\.get)?\s*[\[(]\s*[\"']MOE_KERNELS_|getenv\(\s*[\"']MOE_KERNELS_")
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p.name != "options.py" and pattern.search(p.read_text())]
    assert not offenders, f"MOE_KERNELS_* variables read outside options.py: {offenders}"
