"""The house rules of the package layout, checked on the source (no imports run).

Spec: imports only go down the layers below (a module may import its own layer and the ones under
it, never one above), there is no import loop between modules, the leaves (``mlakv.spec``,
``mlakv._env``) import nothing of mlakv, importing the rule book loads no other mlakv module and
registers no op, and no module imports another module's private names. Imports inside functions
count like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mlakv"

# Lower number = lower layer. A module's layer is that of its longest matching prefix.
LAYERS = {
    "mlakv._env": 0,
    "mlakv._interrupt": 0,
    "mlakv.spec": 0,
    "mlakv.argtypes": 0,
    "mlakv.kernels": 1,
    "mlakv.ops": 2,
    "mlakv.mem_cache": 3,
    "mlakv.distributed": 4,
    "mlakv.compat": 5,
    "mlakv.jit_kernel": 5,
    "mlakv.testing": 5,
    "mlakv.demo": 6,
    "mlakv.bench": 6,
    "mlakv.cli": 7,
    "mlakv.__main__": 7,
    "mlakv": 0,  # the package root: imports nothing at load (its public names are loaded on first use)
}
LEAVES = ("mlakv._env", "mlakv._interrupt", "mlakv.spec", "mlakv.argtypes")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[mod].name == "__init__.py"
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names imported from it, line)`` for every mlakv import in ``mod``."""
    tree = ast.parse(MODULES[mod].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "mlakv"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            if target.split(".")[0] != "mlakv":
                continue
            names = [a.name for a in node.names]
            # ``from pkg import module`` imports the module itself
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not subs:
                out.append((target, rest, node.lineno))
            out += [(s, [], node.lineno) for s in subs]
    return out


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for mod in MODULES:
        g[mod] = {t for t, _, _ in _imports(mod) if t in MODULES and t != mod}
    return g


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_only_go_down(mod):
    up = [
        f"line {line}: {t} (layer {_layer(t)})"
        for t, _, line in _imports(mod)
        if t in MODULES and _layer(t) > _layer(mod)
    ]
    assert not up, f"{mod} (layer {_layer(mod)}) imports upward: {up}"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_of_mlakv(leaf):
    for mod in MODULES:
        if mod == leaf or mod.startswith(leaf + "."):
            outside = [t for t, _, _ in _imports(mod) if not (t == leaf or t.startswith(leaf + "."))]
            assert not outside, f"{mod} is in the leaf {leaf} but imports {outside}"


def test_no_import_loops():
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    loops: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package __init__ re-exporting its own submodules is not a loop of the layout
            real = [m for m in comp if not any(o != m and o.startswith(m + ".") for o in comp)]
            if len(real) > 1:
                loops.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not loops, f"import loops: {loops}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(mod):
    bad = [
        f"line {line}: {n} from {t}"
        for t, names, line in _imports(mod)
        for n in names
        if n.startswith("_") and not n.startswith("__") and t != mod
    ]
    assert not bad, f"{mod} imports private names: {bad}"


def test_importing_the_rule_book_loads_no_other_mlakv_module_and_registers_nothing():
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import mlakv.spec.rules, mlakv.spec.formats, mlakv.spec.tuning\n"
        "new = sorted(m for m in set(sys.modules) - before if m.startswith('mlakv'))\n"
        "print(new)\n"
        "print(hasattr(torch.ops, 'mlakv') and bool(list(torch.ops.mlakv)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded, registered = out.stdout.strip().splitlines()
    assert loaded == str(["mlakv", "mlakv.spec", "mlakv.spec.formats", "mlakv.spec.rules", "mlakv.spec.tuning"])
    assert registered == "False"


def test_the_layer_table_covers_every_module():
    for mod in MODULES:
        assert any(mod == k or mod.startswith(k + ".") for k in LAYERS), f"{mod} has no layer in LAYERS"
