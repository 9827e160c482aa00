"""The ``kvchat`` command (typer): ``kvchat serve``, and more subcommands to come.

Each subcommand lives in a module of its own and registers itself on :data:`app`.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kvchat",
    help="Run local GGUF language models with a content-keyed KV cache and continuous batching.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Run local GGUF language models with a content-keyed KV cache and continuous batching."""


from kvchat.cli import serve as _serve  # noqa: E402,F401  (registers the subcommand)


def main() -> None:
    """Entry point of the ``kvchat`` console script."""
    app()
