"""The package's shape, checked from its source: imports run one way between layers with no
cycle hidden inside functions, no module reaches for another's private names, importing
sparsefx loads no TVM and changes no logger, and `__all__` is the whole public API.

Layers, top to bottom (a module imports its own layer or lower ones only):
cli -> the package root and save/load -> planning, recovery -> backends -> cost ->
channels, sparse -> capture -> errors, target, log, cache, version.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sparsefx"
LAYERS = {
    "cli": 7,
    PACKAGE: 6, "io": 6,  # the root's public API and save/load
    "sparse_ops": 6, "passes": 6,  # alias modules for old pickles: nothing imports them
    "planning": 5, "recovery": 5,
    "backends": 4,
    "cost": 3,
    "channels": 2, "sparse": 2,
    "capture": 1,
    "errors": 0, "target": 0, "log": 0, "cache": 0, "version": 0,
}
# Function-local imports allowed: TVM, loaded on first use only (the TVM backend imports it at
# its top, so importing the backend lazily is the same thing); transformers, which takes seconds
# to import and serves `hf:` model specs only; onnxruntime and openvino, optional, for checking an
# export and as the peers benchmarks measure against (backends/peers.py).
LAZY = ("tvm", "tvm_ffi", f"{PACKAGE}.backends.tvm", "transformers", "onnxruntime", "openvino",
        # a plan kept for its command is answered without PyTorch (`cli.recipe`): the command line's
        # entry loads the full CLI, and the target module PyTorch, only when that does not answer
        "torch", f"{PACKAGE}.cli.main")
# The runtime-only script shipped in bundles as run.py: it runs outside sparsefx, and imports
# numpy and tvm_ffi only once Model() has unpacked them.
SCRIPTS = {f"{PACKAGE}.backends.tvm.bundle_run"}
@dataclass(frozen=True)
class Import:
    importer: str  # module doing the import
    module: str  # module imported (for `from package import submodule`: the submodule)
    names: tuple[str, ...]  # names taken from it (empty for `import x`)
    line: int
    local: bool  # inside a function


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for top in (PACKAGE, "tests", "benchmarks") for p in sorted((ROOT / top).rglob("*.py"))}


def _imports(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, (), child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against this module's package
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                submodules = [a.name for a in child.names if f"{base}.{a.name}" in MODULES]
                found.extend(Import(name, f"{base}.{s}", (), child.lineno, local) for s in submodules)
                names = tuple(a.name for a in child.names if a.name not in submodules)
                if names or not submodules:
                    found.append(Import(name, base, names, child.lineno, local))
            visit(child, local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return found


IMPORTS = [i for name, path in MODULES.items() for i in _imports(name, path)]


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _layer(module: str) -> str:
    return module.split(".")[1] if module != PACKAGE else PACKAGE


def test_layers_import_one_way() -> None:
    wrong = []
    for i in IMPORTS:
        if _ours(i.importer) and _ours(i.module) and i.module in MODULES:
            a, b = _layer(i.importer), _layer(i.module)
            assert a in LAYERS and b in LAYERS, f"give {a if a not in LAYERS else b!r} a layer in LAYERS"
            if LAYERS[a] < LAYERS[b]:
                wrong.append(f"{i.importer}:{i.line} ({a}) imports {i.module} ({b})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph `edges`, or None."""
    state: dict[str, str] = {}

    def search(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := search(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    return next((found for start in sorted(edges) if start not in state and (found := search(start, [start]))), None)


def _edges(key: object) -> dict[str, set[str]]:
    """Import edges between sparsefx modules (function-level imports included), mapped by `key`."""
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if _ours(i.importer) and _ours(i.module) and i.module in MODULES \
                and key(i.importer) != key(i.module):
            edges.setdefault(key(i.importer), set()).add(key(i.module))
    return edges


def test_no_import_cycle() -> None:
    """Between layers (capture, channels, ...), and between any two modules: an import inside a
    function still counts, so a cycle cannot hide there."""
    for what, key in (("layers", _layer), ("modules", lambda m: m)):
        found = _cycle(_edges(key))
        assert found is None, f"import cycle between {what}: {' -> '.join(found)}"


def test_no_function_local_imports() -> None:
    local = [f"{i.importer}:{i.line} imports {i.module}" for i in IMPORTS
             if _ours(i.importer) and i.local and i.importer not in SCRIPTS
             and not any(i.module == lazy or i.module.startswith(lazy + ".") for lazy in LAZY)]
    assert not local, "imports inside functions (hidden cycles?); import at the top:\n" + "\n".join(local)


def test_no_private_names_across_modules() -> None:
    private = []
    for i in IMPORTS:
        if i.module in MODULES and i.module != i.importer:
            private += [f"{i.importer}:{i.line} takes {i.module}.{n}" for n in i.names
                        if n.startswith("_") and not n.startswith("__")]
    for name, path in MODULES.items():  # module._name through an imported module
        bound = {a.asname or a.name: f"{node.module}.{a.name}" for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module for a in node.names
                 if f"{node.module}.{a.name}" in MODULES}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append(f"{name}:{node.lineno} takes {bound[node.value.id]}.{node.attr}")
    assert not private, "private names used across modules; make them public:\n" + "\n".join(private)


PROBE = """
import json, logging, sys
import torch, torch.export, torch.fx, torchvision

def levels():
    found = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return {**found, "<root>": logging.root.level, "<root handlers>": len(logging.root.handlers)}

before = levels()
import sparsefx
after = levels()
print(json.dumps({"before": before, "after": after,
                  "tvm": sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "tvm_ffi"))}))
"""


def test_import_loads_no_tvm_and_changes_no_logger() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert seen["tvm"] == []
    assert "torch.export" in before or "torch._export" in before  # the probe did load torch.export's loggers
    changed = {n: (before[n], after[n]) for n in before if after[n] != before[n]}
    assert not changed, f"importing sparsefx changed these loggers' levels: {changed}"
    new = {n: level for n, level in after.items() if n not in before and level and not _ours(n)}
    assert not new, f"importing sparsefx set levels on other libraries' loggers: {new}"


def _bound_names(tree: ast.Module) -> dict[str, ast.stmt]:
    """Names a module binds at its top level (imports, defs, classes, assignments)."""
    bound = {}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound[node.name] = node
        elif isinstance(node, ast.Assign):
            bound.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return bound


def test_all_is_the_public_api() -> None:
    import sparsefx  # here, so that the static checks above run even where the package does not import

    tree = ast.parse(MODULES[PACKAGE].read_text())
    public = {n for n, node in _bound_names(tree).items()
              if isinstance(node, ast.ImportFrom) and not n.startswith("_") and f"{node.module}.{n}" not in MODULES}
    assert {"compile", "load", "CompiledModel", "prune", "plan", "apply", "analyze"} <= set(sparsefx.__all__)
    assert public <= set(sparsefx.__all__), f"imported by sparsefx/__init__ but not in __all__: {public - set(sparsefx.__all__)}"
    assert len(set(sparsefx.__all__)) == len(sparsefx.__all__)
    # the names are imported on first use (`EXPORTS`): the imports type checkers see, under
    # `if typing.TYPE_CHECKING:`, name the same modules, and `__all__` the same names
    checked = {a.asname or a.name: node.module for block in tree.body if isinstance(block, ast.If)
               for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert checked == sparsefx.HOME
    assert set(sparsefx.__all__) - {"__version__"} == set(sparsefx.HOME)
    for name in sparsefx.__all__:
        assert getattr(sparsefx, name) is not None, name
    with pytest.raises(AttributeError):
        sparsefx.no_such_name  # noqa: B018


@pytest.mark.parametrize("package", sorted(n for n, p in MODULES.items() if _ours(n) and p.name == "__init__.py"))
def test_no_submodule_is_shadowed(package: str) -> None:
    """`from sparsefx.x import f` in a package whose submodule is also named `f` makes
    `sparsefx.f` mean the function or the module depending on import order."""
    submodules = {n.rsplit(".", 1)[1] for n in MODULES if n.rsplit(".", 1)[0] == package and n != package}
    bound = _bound_names(ast.parse(MODULES[package].read_text()))
    shadowed = {n for n in submodules & bound.keys()
                if not (isinstance(bound[n], ast.ImportFrom) and bound[n].module == package)}
    assert not shadowed, f"{package} binds names of its own submodules: {sorted(shadowed)}"
