"""Semantic Kernel plugins shared by the Semantic Kernel test modules (import after
`pytest.importorskip("semantic_kernel")`)."""

from __future__ import annotations

from typing import Annotated

from semantic_kernel.functions import kernel_function


class MathPlugin:
    """A plugin that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    @kernel_function(name="add", description="Add two integers and return their sum.")
    def add(self, a: Annotated[int, "The first integer"], b: Annotated[int, "The second integer"]) -> int:
        self.calls.append((a, b))
        return a + b
