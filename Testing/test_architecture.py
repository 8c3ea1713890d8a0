"""The structure docs/ARCHITECTURE.md describes: layers as folders, imports only downwards, no import loops.

Every module's imports are read with `ast` (module level and inside functions: a lazy import is still a
dependency), resolved to modules of this repository, and checked against the layer order.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "DeepRegistration" / "DeepRegistrationLib"
LAYERS = ("core", "methods", "engine", "frontends")
"""The library's layers, lowest first: a module may import its own layer and the layers before it."""
PACKAGES = {"DeepRegistrationLib": LIB, "training": ROOT / "training", "benchmark": ROOT / "benchmark"}


def module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package, *parts))
    raise ValueError(path)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES.values() for p in folder.rglob("*.py")}


MODULES = all_modules()


def resolve(name: str) -> str | None:
    """The repository module `name` refers to (a module, or the package of a name imported from it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path) -> set[str]:
    """Repository modules imported anywhere in `path`."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {m for m in map(resolve, names) if m is not None and m != own}
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] != "DeepRegistrationLib" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def test_every_library_module_lies_in_a_layer():
    loose = [name for name in MODULES if name.startswith("DeepRegistrationLib.") and layer(name) is None]
    assert not loose, f"modules outside the layer folders {LAYERS}: {loose}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("DeepRegistrationLib.")))
def test_a_layer_imports_only_its_own_and_lower_layers(name):
    upward = sorted(m for m in GRAPH[name] if layer(m) is not None and layer(m) > layer(name))
    assert not upward, f"{name} (layer {LAYERS[layer(name)]}) imports higher layers: {upward}"
    outside = sorted(m for m in GRAPH[name] if not m.startswith("DeepRegistrationLib"))
    assert not outside, f"the library must not import {outside}"


def test_no_two_modules_import_each_other_in_a_loop():
    """Depth-first search for a cycle in the import graph (package __init__ files included)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import loop: " + " → ".join(cycle))


def test_the_checker_sees_a_loop_and_an_upward_import():
    """The two checks above fail on the faults they look for (a synthetic graph)."""
    saved = dict(GRAPH)
    try:
        GRAPH["DeepRegistrationLib.core.geometry"] = {"DeepRegistrationLib.engine.options"}
        with pytest.raises(AssertionError, match="imports higher layers"):
            test_a_layer_imports_only_its_own_and_lower_layers("DeepRegistrationLib.core.geometry")
        GRAPH["DeepRegistrationLib.engine.options"] = saved["DeepRegistrationLib.engine.options"] | {
            "DeepRegistrationLib.core.geometry"}
        with pytest.raises(pytest.fail.Exception, match="import loop"):
            test_no_two_modules_import_each_other_in_a_loop()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_architecture_md_names_only_modules_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"`([\w/]+\.py)`", text))
    assert paths, "ARCHITECTURE.md names no module"
    missing = [p for p in paths if not any(f.as_posix().endswith("/" + p) or f.as_posix() == p
                                           for f in MODULES.values()) and not (ROOT / p).is_file()]
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
    for name in LAYERS:
        assert f"`{name}/`" in text, f"ARCHITECTURE.md does not describe the layer {name}/"
