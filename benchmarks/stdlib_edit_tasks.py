"""Code-edit tasks drawn at random from the Python standard library on this machine.

Speculation is judged on code nobody here wrote: a task is one top-level function
of a standard-library module (12 to 40 lines, pure Python) and one small change to
it, the kind a user asks of a coding assistant:

- ``rename``: rename one of its local variables;
- ``parameter``: add a keyword parameter at the end of its signature;
- ``docstring``: add a one-line docstring (functions without one);
- ``constant``: change one numeric constant in it.

:func:`draw` picks functions and changes with a seeded generator, so a run is
repeatable and its seed (printed by the benchmarks) names it; nothing here is
tuned to the tasks, which change with the seed and with the Python version.

    python benchmarks/stdlib_edit_tasks.py [--count 8] [--seed 1]   # print a draw
"""

from __future__ import annotations

import argparse
import ast
import functools
import random
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from code_edit_tasks import CodeEditTask  # noqa: E402

MIN_LINES, MAX_LINES = 12, 40
SKIPPED_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "ensurepip",
                 "__pycache__", "pydoc_data", "config-3", "distutils"}
"""Directories of the standard library not drawn from (tests, GUIs, vendored and generated code)."""
KINDS = ("rename", "parameter", "docstring", "constant")


def stdlib_functions() -> Iterator[tuple[str, str, ast.FunctionDef]]:
    """(module, source, function) for every top-level function of the standard
    library's Python files whose length is in range, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_PARTS.intersection(relative.parts) or any(p.startswith("config-") for p in relative.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts)
        for node in tree.body:
            lines = (node.end_lineno or 0) - node.lineno + 1 if isinstance(node, ast.FunctionDef) else 0
            if MIN_LINES <= lines <= MAX_LINES:
                yield module, source, node


@functools.cache
def _all_functions() -> tuple[tuple[str, str, ast.FunctionDef], ...]:
    return tuple(stdlib_functions())  # parsing the whole library takes seconds: once per process


def draw(count: int, seed: int) -> list[CodeEditTask]:
    """`count` tasks: distinct functions and a change each, chosen with `seed`."""
    rng = random.Random(seed)
    functions = list(_all_functions())
    rng.shuffle(functions)
    tasks: list[CodeEditTask] = []
    for module, source, function in functions:
        if len(tasks) == count:
            break
        code = textwrap.dedent(ast.get_source_segment(source, function, padded=True) or "")
        if not code or "\t" in code:
            continue
        pasted = ast.parse(code).body[0]  # the function as the user pastes it: lines count from its def
        assert isinstance(pasted, ast.FunctionDef)
        for kind in rng.sample(KINDS, len(KINDS)):  # the first change this function allows
            instruction = _instruction(kind, pasted, code, rng)
            if instruction is not None:
                tasks.append(CodeEditTask(f"{module}.{function.name}:{kind}", code + "\n", instruction))
                break
    return tasks


def _instruction(kind: str, function: ast.FunctionDef, code: str, rng: random.Random) -> str | None:
    """What to ask for a change of `kind` to `function` (parsed from `code`); None if it does not apply."""
    if kind == "rename":
        names = sorted(_local_names(function))
        if not names:
            return None
        old = rng.choice(names)
        return f"Rename the local variable `{old}` to `{old}_{rng.choice(('value', 'item', 'result', 'tmp'))}`."
    if kind == "parameter":
        taken = {a.arg for a in (*function.args.args, *function.args.kwonlyargs)}
        name = rng.choice([n for n in ("verbose", "strict", "limit", "encoding") if n not in taken])
        return f"Add a keyword-only parameter `{name}=None` at the end of the signature of `{function.name}`; " \
               "do not use it yet."
    if kind == "docstring":
        if ast.get_docstring(function) is not None:
            return None
        return f"Add a one-line docstring to `{function.name}` that says what it returns."
    constants = [n for n in ast.walk(function) if isinstance(n, ast.Constant) and type(n.value) in (int, float)
                 and n.value not in (0, 1, -1)]
    if not constants:
        return None
    chosen = rng.choice(constants)
    written = ast.get_source_segment(code, chosen)  # as the code writes it (0x10, 1e-3, 1_000)
    new = chosen.value * 2
    return f"Change the constant `{written}` on line {chosen.lineno} of the function to `{new!r}`."


def _local_names(function: ast.FunctionDef) -> set[str]:
    """Names assigned in `function`'s own body (not its parameters, globals or nested scopes)."""
    parameters = {a.arg for a in (*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs)}
    declared: set[str] = set()
    assigned: set[str] = set()
    for node in _own_scope(function):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned.add(node.id)
    return {n for n in assigned - parameters - declared if len(n) > 1 and not n.startswith("_")}


NESTED_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
                 ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _own_scope(function: ast.FunctionDef) -> Iterator[ast.AST]:
    """The nodes of `function`'s body, not those of the scopes nested in it."""
    pending: list[ast.AST] = list(function.body)
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, NESTED_SCOPES):
            pending.extend(ast.iter_child_nodes(node))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    for task in draw(args.count, args.seed):
        print(f"== {task.name}: {task.instruction}\n{task.code}")


if __name__ == "__main__":
    main()
