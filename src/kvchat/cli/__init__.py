"""The ``kvchat`` command (typer): ``chat``, ``serve``, ``models``, ``bench``.

Each subcommand is a function in a module of its own; this module puts them on :data:`app`.
What a command starts (the server, an engine) comes from its
:class:`~kvchat.cli.runtime.Runtime`: the click context's ``obj``, else the real one.
"""

from __future__ import annotations

import typer

from kvchat.cli.bench import bench
from kvchat.cli.chat import chat
from kvchat.cli.models import models
from kvchat.cli.serve import serve

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


for _command in (bench, chat, models, serve):
    app.command()(_command)


def main() -> None:
    """Entry point of the ``kvchat`` console script."""
    app()
