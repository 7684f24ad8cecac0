"""The package's layering: the core imports without Ray, no module-level import cycle, and no
module far over the size guideline."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raybranch"
RAY_LAYER = ("raybranch.cluster",)  # the only package that may import Ray
MAX_LINES = 440


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def top_level_imports(name: str, path: Path) -> set[str]:
    """raybranch modules imported at module level (not inside functions) by ``name``."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("raybranch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("raybranch"):
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def test_the_core_imports_without_ray():
    core = [m for m in modules() if not m.startswith(RAY_LAYER)]
    code = ("import sys; sys.modules['ray'] = None\n"
            "import importlib\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            "assert not any(k == 'ray' or k.startswith('ray.') for k, v in sys.modules.items() if v is not None)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_no_module_level_import_cycle():
    mods = modules()
    graph = {m: top_level_imports(m, p) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not (d.startswith(m + ".") and mods[m].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_stay_small():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines: {big}"
