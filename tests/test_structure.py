"""The package's layering: a module imports only from the layers below its own (or from its own
package), so each layer can be read, tested and replaced without the ones above it."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "moegemm"
# Lowest first. Modules of one layer may import each other only inside one package (jit, ops, ...).
LAYERS = (
    {"_version", "env", "intmath", "checks", "testing"},
    {"jit"},
    {"device", "symmetric"},
    {"gemm"},
    {"kernels"},
    {"quant"},
    {"reference"},
    {"ops"},
    {"api"},
    {"__init__", "bench"},
    {"__main__"},
)
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name under moegemm: its first component."""
    return module.split(".")[0] or "__init__"


def _imports(path):
    """(importing unit, imported unit) of every relative import in ``path``, lazy ones included."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = list(relative.parts)
    unit = parts[0] if len(parts) > 1 else relative.stem
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - node.level]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{alias.name}".strip(".") for alias in node.names]
            for name in names:
                yield unit, _unit(name)


def test_every_module_has_a_layer():
    units = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert units - set(LAYER_OF) == set()


def test_no_module_imports_upward():
    upward = sorted(f"{path.relative_to(REPO)}: {unit} imports {target}"
                    for path in PACKAGE.rglob("*.py") for unit, target in _imports(path)
                    if unit != target and LAYER_OF[target] >= LAYER_OF[unit])
    assert upward == []
