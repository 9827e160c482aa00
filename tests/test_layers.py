"""The layering rules of docs/architecture.md, read from the source: no module imports a
layer above its own, no package reaches sideways into another of its layer, and the
imports between kvchat's modules form no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[set[str]] = [
    {"kvchat.errors", "kvchat.atomic_file"},
    {"kvchat.llama"},
    {"kvchat.engine"},
    {"kvchat.chat", "kvchat.models"},
    {"kvchat.integrations", "kvchat.server", "kvchat.bench", "kvchat.demo"},
    {"kvchat.cli"},
    {"kvchat"},  # the package's facade: `from kvchat import Engine`
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in (SRC / "kvchat").rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The kvchat modules `name` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("kvchat"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kvchat"))
    return found - {name}


def unit_of(name: str) -> tuple[int, str]:
    """(layer index, top-level unit) of a module: the unit is the longest layer entry it falls under."""
    best: tuple[int, str] | None = None
    for index, units in enumerate(LAYERS):
        for unit in units:
            if (name == unit or name.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (index, unit)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


GRAPH = {name: imports_of(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_layer_above_or_beside_its_own(name: str) -> None:
    layer, unit = unit_of(name)
    for target in GRAPH[name]:
        target_layer, target_unit = unit_of(target)
        assert target_layer < layer or target_unit == unit, (
            f"{name} (layer {layer}, {unit}) imports {target} (layer {target_layer}, {target_unit})")


def test_there_is_no_import_circle() -> None:
    state: dict[str, str] = {}  # name -> "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_engine_needs_no_packaged_model_names() -> None:
    """Model names are resolved above the engine (`kvchat.models.resolve`)."""
    engine_modules = [n for n in MODULES if n.startswith("kvchat.engine")]
    assert not [n for n in engine_modules if "kvchat.models" in GRAPH[n]]
