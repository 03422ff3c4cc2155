"""The package's layers, as docs/ARCHITECTURE.md draws them: imports go down the layers only, and
no module imports another module's private names."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "multitables"

# What each internal layer may import besides itself. The front doors, the integrations and the
# tools sit on top and may import any layer; no layer imports them.
MAY_IMPORT = {
    "_engine": {"errors"},
    "_sources": {"errors", "_engine"},
    "_keys": {"errors"},
    "_hdf5": {"errors", "_engine", "_keys", "_sources"},
    "_streamer": {"errors", "_engine", "_keys", "_hdf5", "_sources"},
    "_reader": {"errors", "_engine", "_keys", "_hdf5", "_sources"},
    "_loader": {"errors", "_engine", "_keys", "_hdf5", "_sources"},
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for each import of the package in ``source``."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            if node.module:
                found.append((target, [a.name for a in node.names]))
            else:  # from . import x: x is a module
                found += [(f"{target}.{a.name}", []) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(m, n) for m, n in found if m.split(".")[0] == "multitables"]


def layer_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    parts = module.split(".")
    layer = parts[1] if len(parts) > 2 or (is_package and len(parts) > 1) else None
    if layer not in MAY_IMPORT:
        return []
    found = []
    for target, _ in imports(source, module, is_package):
        under = target.split(".")[1] if "." in target else ""
        if under != layer and under not in MAY_IMPORT[layer]:
            found.append(f"{module} imports {target}: {layer} may import only "
                         f"{sorted(MAY_IMPORT[layer])}")
    return found


def private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    found = []
    for target, names in imports(source, module, is_package):
        folder = PACKAGE.parent.joinpath(*target.split("."))
        for name in names:
            is_module = any(folder.joinpath(name + ext).exists() for ext in (".py", ".pyx"))
            if name.startswith("_") and not name.startswith("__") and not is_module:
                found.append(f"{module} imports {name} from {target}")
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    assert not layer_violations(path.read_text(), module_name(path), path.name == "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path):
    assert not private_imports(path.read_text(), module_name(path), path.name == "__init__.py")


def test_the_checks_see_what_they_forbid():
    """The engine once opened HDF5 files itself (workers imported source.OpenFile)."""
    bad = "from .._hdf5.source import OpenFile\nfrom ..loader import Loader\n"
    assert len(layer_violations(bad, "multitables._engine.pool")) == 2
    assert layer_violations("from ._ringbuf import Word\nfrom ..errors import ClosedError\n",
                            "multitables._engine.ring") == []
    assert private_imports("from ..loader import _Local\n", "multitables._loader.epoch")
    assert not private_imports("from .._engine import _ringbuf\n", "multitables._reader.stages")
