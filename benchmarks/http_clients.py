"""Client-side driver for benchmarks of OpenAI-compatible chat servers.

It knows nothing about kvchat: it starts a server command, talks to it through
the official `openai` client (async, streaming) and times what a chat client
sees. Every call sends the whole history (system prompt and all earlier turns),
the way stateless chat clients do, so a server that reuses cached prefixes only
has to evaluate the newest user message.

Scenarios:
- `round_robin` with one user: one conversation of T turns;
- `round_robin` with K users: their turns interleave (user 0 turn 0, user 1
  turn 0, ..., user 0 turn 1, ...), one request at a time;
- `concurrent`: K users at once, each doing its T turns in sequence.

`summarize` turns a scenario's records into per-turn and percentile TTFTs,
wall time and aggregate completion tokens per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from openai import AsyncOpenAI

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's notes briefly and plainly, "
    "in a friendly tone, without repeating the question."
)
WORDS = (
    "river bridge garden window market teacher engine harbour forest valley "
    "candle letter orchard station library museum kitchen village mountain "
    "island meadow castle tower lantern compass journey season winter summer "
    "autumn spring morning evening shadow silver copper marble paper pencil "
    "basket ladder blanket pocket button mirror carpet ribbon whistle thunder "
    "breeze pebble feather honey butter bread cheese apple cherry lemon pepper "
    "garlic onion carrot potato tomato coffee sugar salt water stone sand clay "
    "wood iron glass wool cotton silk leather rope chain wheel cart boat sail "
    "anchor net hook bell drum flute violin piano song story poem riddle map "
    "clock calendar school office factory farm field road path gate fence wall "
    "roof door floor stair chimney cellar attic barn stable kennel nest hive"
).split()
MESSAGE_WORDS = 48  # plus the fixed frame: about 60-80 tokens in all


def user_message(user: int, turn: int, seed: int = 0) -> str:
    """A deterministic user message of about 60-80 tokens, different per user and turn."""
    rng = random.Random(f"{seed}/{user}/{turn}")
    notes = " ".join(rng.choice(WORDS) for _ in range(MESSAGE_WORDS))
    return f"Note {turn} from reader {user}: {notes}. Which two of these words fit together best, and why?"


# ---------------------------------------------------------------- servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    """Whether GET url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited within timeout."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_server(
    command: Callable[[int], list[str]],
    ready_path: str,
    log_path: Path,
    start_timeout: float = 300.0,
    stop_timeout: float = 20.0,
) -> Iterator[str]:
    """Run `command(port)` on a free port until the block ends; yield its base URL.

    Waits until GET base_url + ready_path answers 200 (or fails after
    start_timeout, showing the log's tail). The server's stdout and stderr go to
    log_path. On exit: SIGTERM, then SIGKILL after stop_timeout.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while not _ready(base_url + ready_path):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {start_timeout}s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield base_url
    finally:
        _stop(proc, stop_timeout)


# ---------------------------------------------------------------- chat users


@dataclass
class Record:
    """One request as the client saw it."""

    user: int
    turn: int
    ttft_s: float  # until the first chunk with content
    total_s: float
    completion_tokens: int
    prompt_tokens: int | None  # None: the server reported no usage
    cached_tokens: int | None  # None: the server reported no cached tokens
    usage_reported: bool  # False: completion_tokens counts content chunks
    error: str | None = None  # the request failed (connection dropped, 5xx): excluded from the figures
    started_at: float = 0.0  # time.perf_counter() when the request was sent


class ChatUser:
    """One multi-turn conversation that resends its whole history on every call."""

    def __init__(self, client: AsyncOpenAI, model: str, user: int, max_tokens: int | None = 64, seed: int = 0,
                 temperature: float | None = 0) -> None:
        self.client = client
        self.model = model
        self.user = user
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        self.turn = 0

    async def ask(self) -> Record:
        """Send the next user message with the history; stream and time the answer."""
        self.messages.append({"role": "user", "content": user_message(self.user, self.turn, self.seed)})
        start = time.perf_counter()
        first, parts, usage = None, [], None
        try:
            # None: left out, as the official client's defaults do (the server's bound and default apply).
            stream = await self.client.chat.completions.create(
                model=self.model, messages=self.messages, stream=True,
                temperature=self.temperature if self.temperature is not None else openai.NOT_GIVEN,
                max_tokens=self.max_tokens if self.max_tokens is not None else openai.NOT_GIVEN,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(chunk.choices[0].delta.content)
        except openai.APIError as exc:  # recorded, not fatal: one failed request must not end the run
            self.messages.pop()
            self.turn += 1
            elapsed = time.perf_counter() - start
            return Record(self.user, self.turn - 1, elapsed, elapsed, 0, None, None, False, error=repr(exc),
                          started_at=start)
        end = time.perf_counter()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        record = Record(self.user, self.turn, (first or end) - start, end - start, len(parts), None, None, False,
                        started_at=start)
        if usage is not None:
            details = usage.prompt_tokens_details
            record.completion_tokens, record.prompt_tokens = usage.completion_tokens, usage.prompt_tokens
            record.cached_tokens = details.cached_tokens if details is not None else None
            record.usage_reported = True
        self.turn += 1
        return record


def client_for(base_url: str, timeout: float = 900.0) -> AsyncOpenAI:
    """An async OpenAI client for a local server: no key needed, no retries (they would hide failures)."""
    return AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


# ---------------------------------------------------------------- scenarios

Progress = Callable[[Record, int], None]  # (the record just made, records so far)


@dataclass
class ScenarioRun:
    """A scenario's records and its wall time."""

    records: list[Record]
    wall_s: float


async def round_robin(base_url: str, model: str, users: int, turns: int, max_tokens: int = 64,
                      seed: int = 0, progress: Progress | None = None) -> ScenarioRun:
    """`users` conversations whose turns interleave, one request at a time (users=1: one conversation).

    Runs on one server should use different seeds, or a later run finds the
    earlier one's conversations (same text, same greedy answers) in the cache.
    """
    async with client_for(base_url) as client:
        chat_users = [ChatUser(client, model, u, max_tokens, seed) for u in range(users)]
        records: list[Record] = []
        start = time.perf_counter()
        for _ in range(turns):
            for chat_user in chat_users:
                records.append(await chat_user.ask())
                if progress:
                    progress(records[-1], len(records))
        return ScenarioRun(records, time.perf_counter() - start)


async def concurrent(base_url: str, model: str, users: int, turns: int, max_tokens: int | None = 64,
                     seed: int = 0, progress: Progress | None = None,
                     temperature: float | None = 0) -> ScenarioRun:
    """`users` conversations at once, each doing its `turns` turns one after another (seeds: see round_robin)."""
    async with client_for(base_url) as client:
        records: list[Record] = []

        async def converse(chat_user: ChatUser) -> None:
            for _ in range(turns):
                records.append(await chat_user.ask())
                if progress:
                    progress(records[-1], len(records))

        start = time.perf_counter()
        await asyncio.gather(*(converse(ChatUser(client, model, u, max_tokens, seed, temperature))
                               for u in range(users)))
        return ScenarioRun(records, time.perf_counter() - start)


# ---------------------------------------------------------------- summaries


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cached_share(records: list[Record]) -> float | None:
    """Mean share of each prompt the server reported as cached; None if it reported none."""
    shares = [r.cached_tokens / r.prompt_tokens for r in records if r.cached_tokens is not None and r.prompt_tokens]
    return statistics.fmean(shares) if shares else None


def summarize(run: ScenarioRun) -> dict[str, object]:
    """Per-turn median TTFT across users, TTFT p50/p90/p99, wall time and aggregate tokens/s
    (of the requests that succeeded; `failed` counts the others). Figures without a
    successful request to measure (a server that died) are None."""
    records = [r for r in run.records if r.error is None]
    ttfts = [r.ttft_s for r in records]
    turns = sorted({r.turn for r in run.records})
    completion = sum(r.completion_tokens for r in records)

    def median_ttft(turn: int) -> float | None:
        values = [r.ttft_s for r in records if r.turn == turn]
        return statistics.median(values) if values else None

    return {
        "requests": len(records),
        "failed": len(run.records) - len(records),
        "wall_s": run.wall_s,
        "completion_tokens": completion,
        "tokens_per_s": completion / run.wall_s if records else None,
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "ttft_p90_s": percentile(ttfts, 90) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "ttft_per_turn_s": [median_ttft(t) for t in turns],
        "cached_share": cached_share(records),
        "usage_reported": all(r.usage_reported for r in records),
        "first_error": next((r.error for r in run.records if r.error is not None), None),
        "records": [asdict(r) for r in run.records],
    }


def print_progress(label: str, total: int, every: int) -> Progress:
    """A progress callback printing one line every `every` requests and at the end."""
    start = time.perf_counter()

    def report(record: Record, done: int) -> None:
        if done % every == 0 or done == total:
            print(f"  {label}: {done}/{total} requests, {time.perf_counter() - start:.1f}s, "
                  f"last TTFT {record.ttft_s:.2f}s (user {record.user}, turn {record.turn})", flush=True)

    return report
