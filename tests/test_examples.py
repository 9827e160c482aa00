"""The runnable examples in examples/ run as a user would run them, and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system  # each example is a process of its own

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# What each example's output must show: the cache at work, not the model's wording.
EXPECTED = {
    "stateless_chat.py": ["from cache"],
    "chat_session_edit.py": ["cached", "evaluated"],
    "conversation_fork.py": ["nothing was copied", "shared"],
    "semantic_kernel_chat.py": ["cached"],
    "semantic_kernel_tools.py": ["plugin called: add(1234, 4321)"],
    "agent_framework_agent.py": ["tool called: add(1234, 4321)", "every later turn started from the KV cache"],
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for marker in EXPECTED[name]:
        assert marker in result.stdout, f"{name} did not print {marker!r}:\n{result.stdout[-2000:]}"
