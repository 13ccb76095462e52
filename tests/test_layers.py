"""The package layers: no module imports from a layer above its own (a lazy import counts).

    lowmem_core <- pipeline <- trainer_low_mem.planner <- trainer_low_mem <- bench

Imports are read with `ast` from every module of the four packages, including imports inside
functions, `importlib.import_module("...")` with a literal name, and the module names of a lazy
export table (strings naming a project module, in a module that imports by computed name).
Entry points (`*/__main__.py`, train_low_mem.py) are the top layer and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lowmem_core", "pipeline", "trainer_low_mem", "bench")
PROJECT_TOP_LEVEL = (*PACKAGES, "train_low_mem")
PLANNER = "trainer_low_mem.planner"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


MODULES = _project_modules()


def _is_project(name: str) -> bool:
    return name.partition(".")[0] in PROJECT_TOP_LEVEL


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The modules `from X import a, b` loads: X.a where that is a module, else X."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    names = []
    for alias in node.names:
        child = f"{module}.{alias.name}"
        names.append(child if child in MODULES else module)
    return names


def imports_in(source: str, importer: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every project module that module `importer` imports, eagerly or lazily."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    computed_import = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, name) for name in _resolve_from(node, importer, is_package)]
        elif isinstance(node, ast.Call) and _is_import_module_call(node):
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.append((node.lineno, argument.value))
            else:
                computed_import = True
    if computed_import:  # a lazy export table: {"Loader": "pipeline.loader", ...}
        found += [
            (node.lineno, node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in MODULES
        ]
    return [(line, name) for line, name in found if _is_project(name)]


def imports_of(path: Path) -> list[tuple[int, str]]:
    return imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def allowed(importer: str, imported: str) -> bool:
    """Whether module `importer` may import module `imported` (the layers above)."""
    if _within(imported, importer.partition(".")[0]) and not _within(importer, "trainer_low_mem"):
        return True  # within its own package (trainer_low_mem is split below)
    if _within(importer, "lowmem_core"):
        return _within(imported, "lowmem_core")
    if _within(importer, "pipeline"):
        return _within(imported, "lowmem_core") or _within(imported, "pipeline")
    if _within(importer, PLANNER):
        return any(
            _within(imported, allowed)
            for allowed in ("lowmem_core", "pipeline", "trainer_low_mem.config", PLANNER)
        )
    if _within(importer, "trainer_low_mem"):
        return any(_within(imported, p) for p in ("lowmem_core", "pipeline", "trainer_low_mem"))
    if _within(importer, "bench"):
        return any(_within(imported, p) for p in PACKAGES)
    raise AssertionError(f"{importer} belongs to no layer")


def _is_entry_point(path: Path) -> bool:
    return path.name == "__main__.py"


LAYERS = ("lowmem_core", "pipeline", PLANNER, "trainer_low_mem", "bench")


def _layer_of(module: str) -> str:
    return next(layer for layer in LAYERS if _within(module, layer))


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_from_a_layer_above(layer):
    violations = [
        f"{path.relative_to(REPO)}:{line} imports {imported}"
        for module, path in MODULES.items()
        if _layer_of(module) == layer and not _is_entry_point(path)
        for line, imported in imports_of(path)
        if not allowed(module, imported)
    ]
    assert not violations, f"{len(violations)} upward import(s):\n" + "\n".join(violations)


def test_the_walker_sees_lazy_imports():
    """A function-level import, a literal import_module and a lazy export table all count."""
    source = (
        "import importlib\n"
        "_EXPORTS = {'Plan': 'trainer_low_mem.loop'}\n"
        "def f(name):\n"
        "    from trainer_low_mem import model\n"
        "    importlib.import_module('bench.report')\n"
        "    return importlib.import_module(_EXPORTS[name])\n"
    )
    found = {name for _, name in imports_in(source, "pipeline.probe")}
    assert found == {"trainer_low_mem.model", "bench.report", "trainer_low_mem.loop"}
    assert not any(allowed("pipeline.probe", name) for name in found)
