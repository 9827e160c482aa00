"""The soak load: many streaming chat clients against a running kvchat server.

Each client holds one conversation and re-sends its whole history on every
call, as stateless clients do, with random twists: an earlier user message is
edited, `max_tokens`, stop strings and temperature vary, and some streams are
dropped mid-way (the client disconnects). Conversations restart after a few
turns so histories stay within the context. :func:`run_soak` returns what the
clients saw; the caller checks it against the server's metrics.

Used by tests/soak/test_soak.py (CI: about 500 requests) and benchmarks/soak.py
(longer runs, by duration).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

WORDS = ("alpha bravo cedar delta ember fjord grove harbor island jungle kelp lagoon mesa north ocean "
         "prairie quarry ridge summit tundra upland valley willow xeric yarrow zephyr").split()
ODD_TEXT = ("naïve café", "日本語のテキスト", "emoji 🙂🚀", "<|im_start|>system", "</s>", "a\u0301b\u0302",
            "tab\tand\nnewline", "{\"json\": [1, 2]}")
STOP_CHOICES = ([], ["\n"], [".", "!"], ["the"], ["\n\n", "###"])


@dataclass
class SoakConfig:
    """What to run: `requests` in total (or until `duration` seconds pass), by `clients` at once."""

    base_url: str
    model: str
    clients: int = 32
    requests: int | None = 500
    duration: float | None = None
    turns_per_conversation: int = 6
    disconnect_rate: float = 0.15
    edit_rate: float = 0.15
    max_tokens: tuple[int, int] = (1, 24)
    seed: int = 0


@dataclass
class SoakReport:
    """What the clients saw."""

    outcomes: Counter = field(default_factory=Counter)  # completed / disconnected / http_<status> / error_event
    statuses: Counter = field(default_factory=Counter)  # HTTP status of every request
    completion_tokens: int = 0  # from the usage of completed requests
    edits: int = 0
    problems: list[str] = field(default_factory=list)  # first few unexpected answers, for the failure message
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


class _Budget:
    """Hands out request slots until the count or the time runs out."""

    def __init__(self, config: SoakConfig) -> None:
        self.left = config.requests
        self.deadline = None if config.duration is None else time.monotonic() + config.duration

    def take(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
        return True


def _user_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(ODD_TEXT))
    return " ".join(words)


async def _chat_once(http: httpx.AsyncClient, config: SoakConfig, rng: random.Random,
                     history: list[dict], report: SoakReport) -> str | None:
    """One streamed request; the reply text if it completed, None otherwise."""
    body = {
        "model": config.model, "messages": history, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": rng.randint(*config.max_tokens), "temperature": rng.choice([0, 0.5, 1.0]),
        "seed": rng.randrange(1 << 30),
    }
    stop = rng.choice(STOP_CHOICES)
    if stop:
        body["stop"] = stop
    drop_after = rng.randint(1, 6) if rng.random() < config.disconnect_rate else None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        report.statuses[response.status_code] += 1
        if response.status_code != 200:
            report.outcomes[f"http_{response.status_code}"] += 1
            text = (await response.aread()).decode(errors="replace")
            if len(report.problems) < 5:
                report.problems.append(f"{response.status_code}: {text[:300]}")
            return None
        pieces, events, finished = [], 0, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                report.outcomes["error_event"] += 1
                if len(report.problems) < 5:
                    report.problems.append(f"error event: {data[:300]}")
                return None
            events += 1
            if drop_after is not None and events >= drop_after:
                report.outcomes["disconnected"] += 1
                return None  # leaving the block closes the connection mid-stream
            if event.get("usage"):
                report.completion_tokens += event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                pieces.append(choice["delta"].get("content") or "")
                finished = finished or choice.get("finish_reason") is not None
        if not finished:
            report.outcomes["truncated"] += 1
            return None
        report.outcomes["completed"] += 1
        return "".join(pieces)


async def _client(index: int, http: httpx.AsyncClient, config: SoakConfig, budget: _Budget,
                  report: SoakReport) -> None:
    rng = random.Random(config.seed * 1_000 + index)
    history: list[dict] = []
    while budget.take():
        if len(history) >= 1 + 2 * config.turns_per_conversation or not history:
            history = [{"role": "system", "content": f"You are assistant number {index}. Be brief."}]
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if users and rng.random() < config.edit_rate:
            history[rng.choice(users)]["content"] = _user_text(rng)  # the caller edits an earlier message
            report.edits += 1
        history.append({"role": "user", "content": _user_text(rng)})
        reply = await _chat_once(http, config, rng, history, report)
        if reply is None:
            history.pop()  # the unanswered message is dropped, as a retrying caller would
        else:
            history.append({"role": "assistant", "content": reply})


async def run_soak(config: SoakConfig) -> SoakReport:
    """Run the load and return what the clients saw."""
    report = SoakReport()
    budget = _Budget(config)
    limits = httpx.Limits(max_connections=config.clients * 2, max_keepalive_connections=config.clients)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=config.base_url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(_client(i, http, config, budget, report) for i in range(config.clients)))
    report.seconds = time.monotonic() - started
    return report


def resident_bytes(pid: int) -> int:
    """Resident set size of process `pid` (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_metrics(base_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the server's ``/metrics``."""
    return parse_metrics(httpx.get(f"{base_url}/metrics", timeout=30).text)


def wait_until_idle(base_url: str, timeout: float = 60) -> dict[tuple[str, tuple], float]:
    """The metrics once nothing is in flight, in the server or the engine (they lag one step)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape_metrics(base_url)
        busy = (metrics[("kvchat_requests_active", ())] + metrics[("kvchat_requests_queued", ())]
                + metrics[("kvchat_http_requests_in_flight", ())])
        if not busy or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)
