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


def absolute_module(name: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of what ``from <level dots><module> import ...`` names inside
    module `name` (a package's ``__init__`` when `is_package`)."""
    if level == 0:
        return module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(name: str) -> set[str]:
    """The kvchat modules `name` imports, anywhere in its body (relative imports too)."""
    found: set[str] = set()
    is_package = MODULES[name].name == "__init__.py"
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom):
            module = absolute_module(name, is_package, node.level, node.module)
            if not module.startswith("kvchat"):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kvchat"))
    return found - {name}


@pytest.mark.parametrize("name, is_package, level, module, expected", [
    ("kvchat.engine.engine", False, 1, "grammar", "kvchat.engine.grammar"),
    ("kvchat.engine.engine", False, 2, "chat", "kvchat.chat"),
    ("kvchat.engine", True, 1, "grammar", "kvchat.engine.grammar"),
    ("kvchat.engine", True, 2, None, "kvchat"),
    ("kvchat.server.routes.chat", False, 3, "cli", "kvchat.cli"),
])
def test_relative_imports_are_read_as_the_modules_they_name(name, is_package, level, module, expected) -> None:
    assert absolute_module(name, is_package, level, module) == expected


def test_a_relative_upward_import_would_be_caught() -> None:
    """``from ..server import x`` in an engine module resolves to kvchat.server, a layer above."""
    target = absolute_module("kvchat.engine.engine", False, 2, "server")
    assert unit_of(target)[0] > unit_of("kvchat.engine.engine")[0]


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


KV_MEMORY_CALLS = {"seq_copy", "seq_remove", "seq_shift", "seq_state", "set_seq_state", "seq_pos_max"}
"""The `KVMemory` methods (kvchat.engine.backend): llama_memory_seq_* and the state calls."""
REQUEST_KV_FIELDS = {"seq_id", "n_past", "resident_prefix", "shared_prefix", "locked_node", "reserved_cells"}
"""`SequenceKV`'s fields, which `Request` reads through properties."""


def attribute_calls(name: str) -> set[str]:
    return {node.func.attr for node in ast.walk(ast.parse(MODULES[name].read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def attribute_writes(name: str) -> set[str]:
    written = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute):
                    written.add(part.attr)
    return written


def test_only_the_pool_calls_the_kv_memory() -> None:
    """Every llama_memory_seq_* call goes through `KVPool`: no other module calls a
    `KVMemory` method, and only the llama wrapper calls llama.cpp's own."""
    callers = {name for name in MODULES if attribute_calls(name) & KV_MEMORY_CALLS}
    assert callers == {"kvchat.engine.kv_pool"}
    raw = {name for name in MODULES if any(c.startswith("llama_memory_seq_") for c in attribute_calls(name))}
    assert raw == {"kvchat.llama.context"}


def test_a_requests_kv_fields_have_one_writer() -> None:
    writers = {name for name in MODULES if attribute_writes(name) & REQUEST_KV_FIELDS}
    assert writers == {"kvchat.engine.kv_pool"}, writers
