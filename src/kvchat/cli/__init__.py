"""The ``kvchat`` command (typer): ``chat``, ``serve``, ``models``, ``bench``.

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


# Importing a subcommand's module registers it on `app`, so these imports come
# after `app` exists (E402) and are not used by name (F401).
from kvchat.cli import bench as _bench  # noqa: E402, F401 - registers `kvchat bench`
from kvchat.cli import chat as _chat  # noqa: E402, F401 - registers `kvchat chat`
from kvchat.cli import models as _models  # noqa: E402, F401 - registers `kvchat models`
from kvchat.cli import serve as _serve  # noqa: E402, F401 - registers `kvchat serve`


def main() -> None:
    """Entry point of the ``kvchat`` console script."""
    app()
