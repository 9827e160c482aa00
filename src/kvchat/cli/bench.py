"""``kvchat bench``: the multi-turn chat benchmark, prefix cache on and off in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvchat.models import DEFAULT_CHAT_MODEL


def bench(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Packaged model name or .gguf path.")
    ] = DEFAULT_CHAT_MODEL,
    turns: Annotated[int, typer.Option(min=1, max=200, help="Turns per user.")] = 8,
    users: Annotated[int, typer.Option(min=1, max=64, help="Users chatting at once.")] = 1,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per reply.")] = 32,
    ctx_size: Annotated[int, typer.Option(min=256, help="KV cells of each engine.")] = 8192,
    plot: Annotated[Path | None, typer.Option(help="Write a chart of time to first token per turn (PNG).")] = None,
) -> None:
    """Chat N turns with K users re-sending the whole history, with the prefix cache on and off."""
    from kvchat.bench import plot_ttft, run_benchmark
    from kvchat.llama import Model
    from kvchat.models import resolve

    if plot is not None:
        try:
            import matplotlib  # noqa: F401 - only checks that it is installed
        except ImportError:
            typer.secho("--plot needs matplotlib: pip install matplotlib", err=True, fg="red")
            raise typer.Exit(2) from None
    console = Console()
    with Model(resolve(model)) as loaded, console.status("benchmarking...") as status:
        results = run_benchmark(
            loaded,
            users=users,
            turns=turns,
            max_tokens=max_tokens,
            n_ctx=ctx_size,
            progress=lambda text: status.update(text),
        )
    table = Table(
        title=f"{users} user(s), {turns} turns, {max_tokens}-token replies: time to first token (median over users)"
    )
    for column in ("turn", "prompt tokens", "cache on: evaluated", "TTFT on (s)", "TTFT off (s)", "off / on"):
        table.add_column(column, justify="right")
    for on, off in zip(results["on"], results["off"], strict=True):
        table.add_row(
            str(on.turn),
            str(on.prompt_tokens // users),
            str(on.evaluated_tokens // users),
            f"{on.median_ttft:.3f}",
            f"{off.median_ttft:.3f}",
            f"{off.median_ttft / on.median_ttft:.1f}x",
        )
    console.print(table)
    if plot is not None:
        plot_ttft(results, str(plot), f"{Path(model).stem}: {users} user(s), whole history each turn")
        console.print(f"chart written to {plot}")
