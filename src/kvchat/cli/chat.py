"""``kvchat chat``: a streaming terminal chat that shows what each turn cost.

Lines are messages; lines starting with ``/`` are commands (``/help``). It
works on a terminal and with piped input (one message or command per line), so
it can be scripted. Answers go to stdout; the per-turn figures (prompt, cached
and evaluated tokens, time to first token, tokens/s) go to stderr.

Decisions: the chat keeps a `ChatSession` (messages only; speed comes from the
prefix cache) with ``overflow="truncate_oldest"``, so a long chat drops its
oldest turns instead of failing. ``/edit N TEXT`` numbers messages as
``/history`` shows them; editing a user message drops what followed it and
answers again, editing any other message changes it in place. Ctrl-C during an
answer stops that answer (the partial answer stays in the history); at the
prompt, Ctrl-C or Ctrl-D leaves. A command that fails prints ``error: ...`` and
the chat goes on as it was: ``/load`` of a file that is missing, a directory,
too large, too deeply nested or not a saved chat keeps the current chat, and
``/save`` to a path that cannot be written leaves no file (saves are atomic).
"""

from __future__ import annotations

import functools
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, TextIO

import typer
from rich.console import Console
from rich.table import Table

from kvchat.cli.runtime import runtime_of
from kvchat.errors import KVChatError
from kvchat.models import DEFAULT_CHAT_MODEL

if TYPE_CHECKING:  # imported when a command runs: `kvchat --help` stays fast
    from kvchat.chat.session import ChatSession, SessionReply
    from kvchat.engine import EngineStats, Usage

HELP = """\
/retry          answer the last message again
/undo           remove the last exchange
/edit N TEXT    replace message N's text (a user message is answered again)
/system TEXT    set the system prompt
/history        list the messages with their numbers
/save FILE      save the chat (messages, JSON)
/load FILE      load a saved chat
/stats          the figures of every turn so far, and the drafts' acceptance
/help           this list
/quit           leave (also Ctrl-D)"""


@dataclass(frozen=True)
class TurnStats:
    """What one answer cost."""

    prompt_tokens: int
    cached_tokens: int
    evaluated_tokens: int
    completion_tokens: int
    ttft: float | None
    tokens_per_second: float | None
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    def line(self) -> str:
        ttft = "-" if self.ttft is None else f"{self.ttft * 1000:.0f} ms"
        rate = "-" if self.tokens_per_second is None else f"{self.tokens_per_second:.1f} tok/s"
        return (
            f"prompt {self.prompt_tokens} · cached {self.cached_tokens} · evaluated {self.evaluated_tokens} · "
            f"completion {self.completion_tokens} · first token {ttft} · {rate}"
        )


class ChatREPL:
    """The chat loop over a `ChatSession`: reads lines, runs commands, streams answers."""

    def __init__(self, session: ChatSession, *, out: Console, info: Console) -> None:
        self.session = session
        self.out = out
        self.info = info
        self.turns: list[TurnStats] = []

    # -- the loop ---------------------------------------------------------------

    def run(self, lines: TextIO, interactive: bool) -> None:
        """Handle `lines` until EOF or /quit."""
        while True:
            try:
                line = self.out.input("[bold cyan]you>[/] ") if interactive else lines.readline()
            except (EOFError, KeyboardInterrupt):
                break
            if not interactive and not line:
                break  # EOF
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
            else:
                self.answer(functools.partial(self.session.send, line))

    def command(self, line: str) -> bool:
        """Run one slash command; False means leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/help":
                self.info.print(HELP, markup=False)
            elif name == "/retry":
                self.answer(self.session.regenerate)
            elif name == "/undo":
                self.session.undo()
                self.info.print("removed the last exchange")
            elif name == "/edit":
                self.edit(rest)
            elif name == "/system":
                self.set_system(rest)
            elif name == "/history":
                self.print_history()
            elif name == "/save":
                self.session.save(self.require(rest, "/save FILE"))
                self.info.print(f"saved {len(self.session.messages)} messages to {rest}")
            elif name == "/load":
                self.load(self.require(rest, "/load FILE"))
            elif name == "/stats":
                self.print_stats()
            else:
                self.info.print(f"unknown command {name}; /help lists them", style="yellow")
        except (KVChatError, ValueError, OSError) as exc:  # the chat goes on as it was
            self.info.print(f"error: {exc}", style="red")
        return True

    # -- commands -------------------------------------------------------------------

    def answer(self, start: Callable[[], SessionReply]) -> None:
        """Stream the reply that `start()` begins; Ctrl-C stops it."""
        try:
            reply = start()
        except KVChatError as exc:
            self.info.print(f"error: {exc}", style="red")
            return
        started = time.perf_counter()
        first: float | None = None
        # Ctrl-C cancels the reply instead of raising: the stream then ends
        # normally (within one engine step) and the partial answer is kept.
        previous = signal.signal(signal.SIGINT, lambda *_: reply.cancel())
        try:
            for delta in reply:
                if delta.content:
                    first = first or time.perf_counter()
                    self.out.print(delta.content, end="", markup=False, highlight=False)
                for call in delta.tool_calls:
                    self.out.print(f"[tool call] {call.name}({call.arguments})", markup=False)
        finally:
            signal.signal(signal.SIGINT, previous)
        if reply.completion is not None and reply.completion.finish_reason == "cancelled":
            self.out.print(" [stopped]", style="yellow", end="", markup=False)
        self.out.print()
        if reply.completion is not None:
            self.record(reply.completion.usage, started, first)

    def record(self, usage: Usage, started: float, first: float | None) -> None:
        decoding = time.perf_counter() - (first or started)
        rate = (usage.completion_tokens - 1) / decoding if first and usage.completion_tokens > 1 else None
        stats = TurnStats(
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.evaluated_tokens,
            usage.completion_tokens,
            usage.time_to_first_token,
            rate,
            usage.draft_tokens,
            usage.accepted_draft_tokens,
        )
        self.turns.append(stats)
        self.info.print(stats.line(), style="dim", highlight=False)

    def edit(self, rest: str) -> None:
        number, _, text = rest.partition(" ")
        if not number.isdigit() or not text.strip():
            raise ValueError("usage: /edit N TEXT (N as /history shows)")
        index = int(number) - 1
        if not 0 <= index < len(self.session.messages):
            raise ValueError(f"there is no message {number}; /history lists them")
        self.session.edit(index, text.strip())
        if self.session.messages[index]["role"] == "user":
            del self.session.messages[index + 1 :]
            self.answer(self.session.respond)
        else:
            self.info.print(f"message {number} changed")

    def set_system(self, text: str) -> None:
        messages = self.session.messages
        if messages and messages[0]["role"] == "system":
            if text:
                messages[0]["content"] = text
            else:
                del messages[0]
        elif text:
            messages.insert(0, {"role": "system", "content": text})
        self.info.print("system prompt set" if text else "system prompt removed")

    def print_history(self) -> None:
        for number, message in enumerate(self.session.messages, start=1):
            content = message_text(message.get("content"))
            if len(content) > 70:
                content = content[:67] + "..."
            self.info.print(f"{number:>3} {message['role']:<9} {content}", markup=False, highlight=False)

    def load(self, path: str) -> None:
        """Replace the chat with the one saved in `path`; a file that cannot be
        loaded raises (with the reason) and the current chat stays."""
        from kvchat.chat.session import ChatSession

        old = self.session
        self.session = ChatSession.load(old.engine, path, sampling=old.sampling, overflow=old.overflow)
        self.info.print(f"loaded {len(self.session.messages)} messages from {path}")

    def print_stats(self) -> None:
        if not self.turns:
            self.info.print("no turns yet")
            return
        table = Table(title="turns")
        counts = ("#", "prompt", "cached", "evaluated", "completion", "drafted", "accepted")
        for column in (*counts, "first token (ms)", "tok/s"):
            table.add_column(column, justify="right")
        for number, t in enumerate(self.turns, start=1):
            table.add_row(
                str(number),
                str(t.prompt_tokens),
                str(t.cached_tokens),
                str(t.evaluated_tokens),
                str(t.completion_tokens),
                str(t.draft_tokens),
                str(t.accepted_draft_tokens),
                "-" if t.ttft is None else f"{t.ttft * 1000:.0f}",
                "-" if t.tokens_per_second is None else f"{t.tokens_per_second:.1f}",
            )
        self.info.print(table)
        self.info.print(speculation_line(self.session.engine.stats()))

    @staticmethod
    def require(value: str, usage: str) -> str:
        if not value:
            raise ValueError(f"usage: {usage}")
        return value


def message_text(content: object) -> str:
    """A message's content as one line of text: a string as it is, the text parts of a
    list of content parts joined, anything else (null) empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def speculation_line(stats: EngineStats) -> str:
    """Speculative decoding since the engine started: tokens drafted, accepted, and the rate."""
    return (
        f"speculation: drafted {stats.draft_tokens} · accepted {stats.accepted_draft_tokens} · "
        f"acceptance {stats.acceptance_rate:.0%}"
    )


def chat(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", "-m", envvar="KVCHAT_MODEL", help="Packaged model name or .gguf path.")
    ] = DEFAULT_CHAT_MODEL,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 1024,
    temperature: Annotated[float, typer.Option(min=0, max=2)] = 0.7,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (repeatable answers).")] = None,
    ctx_size: Annotated[int, typer.Option(min=256, help="KV cells (history and cache).")] = 8192,
    speculation: Annotated[
        Literal["auto", "off"],
        typer.Option(help="Speculative decoding: 'auto' drafts tokens where it pays; 'off' decodes one per step."),
    ] = "auto",
) -> None:
    """Chat with a model in the terminal; /help lists the commands."""
    from kvchat.chat.session import ChatSession
    from kvchat.engine import EngineSettings, SamplingParams

    runtime = runtime_of(ctx)
    interactive = sys.stdin.isatty()
    out, info = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    try:
        settings = EngineSettings(n_ctx=ctx_size, max_running=2, n_seq_max=8, speculation=speculation)
        with runtime.open_engine(runtime.resolve_model(model), settings) as engine:
            sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
            session = ChatSession(engine, system=system, sampling=sampling, overflow="truncate_oldest")
            if interactive:
                info.print(f"kvchat on {model}: /help for commands, Ctrl-D to leave", style="dim")
            ChatREPL(session, out=out, info=info).run(sys.stdin, interactive)
    except KVChatError as exc:
        typer.secho(f"kvchat chat: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None
