"""The code-edit tasks the speculation benchmarks draw from the standard library:
repeatable by seed, distinct functions, and every change asked for applies to its code."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from stdlib_edit_tasks import KINDS, MAX_LINES, MIN_LINES, draw  # noqa: E402


def test_a_seed_names_a_draw_and_every_task_applies_to_its_function() -> None:
    tasks = draw(24, seed=7)
    assert [t.name for t in tasks] == [t.name for t in draw(24, seed=7)]
    assert [t.name for t in tasks] != [t.name for t in draw(24, seed=8)]
    functions = [t.name.rsplit(":", 1)[0] for t in tasks]
    assert len(tasks) == 24 and len(set(functions)) == 24
    assert {t.name.rsplit(":", 1)[1] for t in tasks} <= set(KINDS)
    for task in tasks:
        (function,) = ast.parse(task.code).body  # one whole function, dedented, as pasted
        assert isinstance(function, ast.FunctionDef) and function.name == task.name.split(":")[0].rsplit(".")[-1]
        assert MIN_LINES <= len(task.code.rstrip("\n").splitlines()) <= MAX_LINES
        kind = task.name.rsplit(":", 1)[1]
        if kind == "rename":
            old = re.search(r"variable `(\w+)`", task.instruction).group(1)
            stores = [n for n in ast.walk(function) if isinstance(n, ast.Name) and n.id == old
                      and isinstance(n.ctx, ast.Store)]
            assert stores and old not in {a.arg for a in function.args.args}
        elif kind == "docstring":
            assert ast.get_docstring(function) is None
        elif kind == "constant":
            value, line = re.search(r"constant `([^`]+)` on line (\d+)", task.instruction).groups()
            assert value in task.code.splitlines()[int(line) - 1]
        else:
            name = re.search(r"parameter `(\w+)=None`", task.instruction).group(1)
            assert name not in {a.arg for a in (*function.args.args, *function.args.kwonlyargs)}
    assert task.code in task.user_message()


def test_a_comprehension_variable_is_not_offered_for_renaming() -> None:
    # `line` of `(... for line in lines)` lives in the comprehension's own scope.
    from stdlib_edit_tasks import _local_names

    (function,) = ast.parse("def f(lines):\n    found = [x for line in lines for x in line]\n    return found\n").body
    assert _local_names(function) == {"found"}
