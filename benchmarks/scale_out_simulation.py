"""Scale-out by simulation: kvchat replicas behind three routing policies, no model.

A discrete-event simulation of `replicas` kvchat engines serving `conversations`
multi-turn chats, routed by prefix affinity (the real router's
:class:`~kvchat.server.ray_serve.policy.PrefixAffinityPolicy`, fed the real
routing text of :func:`~kvchat.server.ray_serve.routing_text.routing_hint`),
by least load, or round robin. Replicas cost time by prefill and decode rates
(defaults measured on this project's 2-core machine; a benchmark that measures
them in its own run passes its rates to `simulate`).

    python benchmarks/scale_out_simulation.py

prints a table and writes benchmarks/results/scale_out_simulation.json and
docs/images/scale_out_simulation.png.

The model (deterministic for a seed; every policy sees the same workload):

- Tokens are characters. A conversation is one chat-completions request per turn
  with the whole history (a stateless client): one system prompt shared by all
  (`system_tokens`), then per turn a user message (`user_tokens`, uniform) and an
  answer (`answer_tokens`, uniform), each of random characters. A request's
  prompt is its routing text (tenant, path, then the messages, as the router
  reads them), so its length in characters is its prompt tokens, and turn n+1's
  text extends turn n's.
- Arrivals: conversations start as a Poisson process (`arrival_rate` per
  second); each next turn is sent `think_time` seconds (exponential, mean
  `think_time_s`) after the previous answer's last token.
- A replica is kvchat's continuous batching: at most `max_running` requests
  admitted (first come, first served; the rest wait), and each step decodes one
  token for every generating request and then evaluates prompt chunks, in
  admission order, up to `n_batch` tokens in all (chunked prefill). A step costs
  ``t1 * (1 + decode_slowdown * (b - 1))`` for `b` decoding requests, with
  ``t1 = 1 / decode_tokens_per_s``, plus its prompt tokens over
  `prefill_tokens_per_s`. The first token comes from the logits of the prompt's
  last token, so time to first token = waiting + the steps up to the end of the
  one that evaluates the last prompt chunk.
- A replica's cache is the true state, apart from the router's approximate tree:
  the shared prefix (held once) and each conversation's longest resident
  prefix, least recently used conversations evicted past `capacity_tokens`.
  A request's cached tokens, looked up at admission, are its conversation's
  resident prefix on that replica, else the prefix all conversations share if
  the replica holds anything. A running request's entry is pinned; when it
  finishes, its prompt and answer are resident.
- Policies see each replica's requests in flight (waiting or running) when a
  request arrives. Affinity records each request's text on the replica chosen
  (`record`) and knows each replica's capacity (`set_capacity`).

Defaults (Qwen2.5-Coder 0.5B Q4_K_M, 2 threads):

- `prefill_tokens_per_s` 250: benchmarks/results/prefill_shape.json evaluates
  64-128-token chunks at 200-240 tok/s (0-1,000 cached tokens before them);
  /work/shared/LLAMA_CPP_NOTES.md gives about 320 tok/s for long prompts.
- `decode_tokens_per_s` 50 and `decode_slowdown` 0.4: one stream decodes
  50.3 tok/s and eight 101.2 tok/s in all in benchmarks/results/kv_residency.json
  (a step of 8 costs 3.98 single steps: 1 + 0.42 * 7); the notes give 61 and 126
  (3.87 steps: 1 + 0.41 * 7).
- `capacity_tokens` 30,000: kvchat's default pool of 8,192 KV cells plus its
  256 MiB RAM tier at 12 KiB per token (about 21,800 tokens).
- `max_running` 16 and `n_batch` 512: kvchat's `EngineSettings` defaults.
- `arrival_rate` 0.75 conversations/s (with `think_time_s` 5): keeps the
  cluster 60-65% busy under affinity while arrivals are steady (utilisation:
  the share of replica time spent in steps over the middle half of the arrival
  period; the whole run, ramp-up and drain included, is reported apart).

Left out: prefill slowing with the history before the chunk and decode with the
cells in use (both mild at these lengths), speculative decoding, the cost of
restoring an entry from the RAM tier, and the network.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvchat.server.ray_serve.policy import PrefixAffinityPolicy
from kvchat.server.ray_serve.routing_text import routing_hint

RESULTS = Path(__file__).parent / "results" / "scale_out_simulation.json"
CHART = Path(__file__).parents[1] / "docs" / "images" / "scale_out_simulation.png"

POLICIES = ("affinity", "least_loaded", "round_robin")
PATH = "/v1/chat/completions"
AUTHORIZATION = "Bearer simulated-tenant"
# CJK ideographs: 20,992 code points, so two random messages rarely share a first character.
ALPHABET = [chr(code) for code in range(0x4E00, 0x9FFF + 1)]


@dataclass(frozen=True)
class Workload:
    """Sizes and timing of the simulated traffic (tokens and seconds)."""

    conversations: int = 512
    turns: int = 8
    system_tokens: int = 200
    user_tokens: tuple[int, int] = (30, 80)
    answer_tokens: tuple[int, int] = (64, 128)
    arrival_rate: float = 0.75
    think_time_s: float = 5.0


@dataclass(frozen=True)
class ReplicaModel:
    """How a replica spends time and how much it caches."""

    prefill_tokens_per_s: float = 250.0
    decode_tokens_per_s: float = 50.0
    decode_slowdown: float = 0.4
    capacity_tokens: int = 30_000
    max_running: int = 16
    n_batch: int = 512

    def step_seconds(self, decoding: int, prompt_tokens: int) -> float:
        """One engine step: a decode row for each of `decoding` requests plus `prompt_tokens` of prompts."""
        decode = 0.0
        if decoding:
            decode = (1 + self.decode_slowdown * (decoding - 1)) / self.decode_tokens_per_s
        return decode + prompt_tokens / self.prefill_tokens_per_s


# -- workload -----------------------------------------------------------------


@dataclass
class Conversation:
    """One user's chat: the routing text of each turn's request and what is resident after it."""

    start: float
    texts: list[str]
    answer_tokens: list[int]
    resident_after: list[int]
    """Tokens of history (prompt and answer) after each turn's answer."""
    think_s: list[float]
    """Pause before each turn after the first (index 0 unused)."""


def _chars(rng: random.Random, count: int) -> str:
    return "".join(rng.choices(ALPHABET, k=count))


def _header() -> int:
    """Length of the routing texts' tenant-and-path header (the same for every request here)."""
    return routing_hint(PATH, b'{"messages": []}', AUTHORIZATION).header


def _text(messages: list[dict[str, str]]) -> str:
    body = json.dumps({"model": "qwen2.5-coder-0.5b-instruct", "messages": messages}).encode()
    return routing_hint(PATH, body, AUTHORIZATION).text


def make_workload(workload: Workload, seed: int) -> tuple[list[Conversation], int]:
    """The conversations for `seed`, and the prefix length all of them share."""
    rng = random.Random(seed)
    system = {"role": "system", "content": _chars(rng, workload.system_tokens)}
    conversations, start = [], 0.0
    for _ in range(workload.conversations):
        start += rng.expovariate(workload.arrival_rate)
        messages = [system]
        texts, answers, resident, think = [], [], [], []
        for turn in range(workload.turns):
            messages.append({"role": "user", "content": _chars(rng, rng.randint(*workload.user_tokens))})
            texts.append(_text(messages))
            answers.append(rng.randint(*workload.answer_tokens))
            messages.append({"role": "assistant", "content": _chars(rng, answers[-1])})
            resident.append(len(_text(messages)))
            think.append(rng.expovariate(1 / workload.think_time_s) if turn else 0.0)
        conversations.append(Conversation(start, texts, answers, resident, think))
    return conversations, _shared_prefix(system)


def _shared_prefix(system: dict[str, str]) -> int:
    """Characters every conversation's text shares: up to its first user message's content."""
    first = _text([system, {"role": "user", "content": "\x01"}])
    second = _text([system, {"role": "user", "content": "\x02"}])
    return next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)


# -- routing ------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A baseline policy's decision, shaped like `RoutingDecision`."""

    replica: Hashable
    kind: str


class LeastLoadedPolicy:
    """The replica with the fewest requests in flight; ties rotate."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, text: str, loads: Mapping[Hashable, int], *, header: int = 0) -> Choice:
        """The least loaded replica among `loads` (`text` is ignored)."""
        least = min(loads.values())
        ties = [replica for replica, load in loads.items() if load == least]
        self._turn += 1
        return Choice(ties[self._turn % len(ties)], "least_loaded")

    def record(self, replica: Hashable, text: str) -> None:
        """Nothing to remember."""

    def set_capacity(self, replica: Hashable, chars: int | None) -> None:
        """Capacity does not matter to this policy."""


class RoundRobinPolicy:
    """Each replica in turn, whatever its load."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, text: str, loads: Mapping[Hashable, int], *, header: int = 0) -> Choice:
        """The next replica of `loads` in order (`text` is ignored)."""
        replicas = list(loads)
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return Choice(replica, "round_robin")

    def record(self, replica: Hashable, text: str) -> None:
        """Nothing to remember."""

    def set_capacity(self, replica: Hashable, chars: int | None) -> None:
        """Capacity does not matter to this policy."""


def make_policy(name: str) -> Any:
    """The policy called `name` (one of `POLICIES`)."""
    if name == "affinity":
        return PrefixAffinityPolicy()
    if name == "least_loaded":
        return LeastLoadedPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")


# -- replicas -----------------------------------------------------------------


class ReplicaCache:
    """What a replica's engine really holds: the shared prefix once, plus each
    conversation's resident prefix, least recently used conversations evicted first."""

    def __init__(self, capacity: int, shared: int) -> None:
        self.capacity = capacity
        self.shared = shared
        self._length: OrderedDict[int, int] = OrderedDict()
        self._own = 0
        """Tokens past the shared prefix, summed over the conversations held."""
        self.pinned: set[int] = set()

    @property
    def held(self) -> int:
        """Tokens resident."""
        return self._own + (self.shared if self._length else 0)

    def cached(self, conversation: int) -> int:
        """Tokens of `conversation`'s next prompt already resident."""
        length = self._length.get(conversation)
        if length is not None:
            return length
        return self.shared if self._length else 0

    def store(self, conversation: int, length: int) -> None:
        """`conversation`'s first `length` tokens are resident and most recently used."""
        old = self._length.pop(conversation, None)
        if old is not None:
            self._own -= old - self.shared
        self._length[conversation] = length
        self._own += length - self.shared
        self._evict()

    def _evict(self) -> None:
        while self.held > self.capacity:
            victim = next((key for key in self._length if key not in self.pinned), None)
            if victim is None:
                return
            self._own -= self._length.pop(victim) - self.shared


class Request:
    """One turn's request as it moves through a replica."""

    __slots__ = ("arrival", "cached", "conversation", "decode_left", "prefill_left", "prompt", "turn")

    def __init__(self, conversation: int, turn: int, arrival: float, prompt: int) -> None:
        self.conversation = conversation
        self.turn = turn
        self.arrival = arrival
        self.prompt = prompt
        self.cached = 0
        self.prefill_left = 0
        self.decode_left = 0


class Replica:
    """A kvchat engine's queue, running set and cache; steps are timed by `ReplicaModel`."""

    def __init__(self, model: ReplicaModel, shared: int) -> None:
        self.model = model
        self.cache = ReplicaCache(model.capacity_tokens, shared)
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.generating: list[Request] = []
        self.stepping = False
        self._step: tuple[list[Request], list[tuple[Request, int]]] = ([], [])

    @property
    def in_flight(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.prefilling) + len(self.generating)

    def start_step(self) -> tuple[float, int]:
        """Admit what fits, plan the next step; its duration and its decode rows."""
        self._admit()
        decoding = list(self.generating)
        budget = self.model.n_batch - len(decoding)
        chunks = []
        for request in self.prefilling:
            if budget <= 0:
                break
            take = min(request.prefill_left, budget)
            chunks.append((request, take))
            budget -= take
        self._step = (decoding, chunks)
        self.stepping = True
        return self.model.step_seconds(len(decoding), sum(take for _, take in chunks)), len(decoding)

    def finish_step(self) -> tuple[list[Request], list[Request]]:
        """Apply the planned step: the requests that got their first token, and those that finished."""
        decoding, chunks = self._step
        self.stepping = False
        finished = []
        for request in decoding:
            request.decode_left -= 1
            if request.decode_left == 0:
                finished.append(request)
        if finished:
            done = set(map(id, finished))
            self.generating = [request for request in self.generating if id(request) not in done]
        first = []
        for request, take in chunks:
            request.prefill_left -= take
            if request.prefill_left == 0:
                first.append(self.prefilling.popleft())
        for request in first:
            if request.decode_left == 0:  # a one-token answer ends with its first token
                finished.append(request)
            else:
                self.generating.append(request)
        for request in finished:
            self.cache.pinned.discard(request.conversation)
        return first, finished

    def has_work(self) -> bool:
        """Whether a step has anything to do."""
        return bool(self.waiting or self.prefilling or self.generating)

    def _admit(self) -> None:
        while self.waiting and len(self.prefilling) + len(self.generating) < self.model.max_running:
            request = self.waiting.popleft()
            request.cached = min(self.cache.cached(request.conversation), request.prompt - 1)
            request.prefill_left = request.prompt - request.cached  # at least the last token, for its logits
            self.cache.pinned.add(request.conversation)
            self.cache.store(request.conversation, request.prompt)
            self.prefilling.append(request)


# -- the event loop -------------------------------------------------------------

_ARRIVAL, _STEP_END = 0, 1


@dataclass
class _Tally:
    """What a run measured, gathered as it goes."""

    ttft: list[tuple[int, float, float]]
    """(turn, arrival, seconds to first token) per request."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    busy_s: float = 0.0
    busy_window_s: float = 0.0
    decode_rows: int = 0
    decode_steps: int = 0


class Cluster:
    """The replicas, the policy in front of them and the event queue: one run."""

    def __init__(self, chats: list[Conversation], shared: int, policy: Any, model: ReplicaModel, replicas: int) -> None:
        self.chats = chats
        self.policy = policy
        self.nodes = [Replica(model, shared) for _ in range(replicas)]
        for index in range(replicas):
            policy.set_capacity(index, model.capacity_tokens)
        self.placements: list[list[int]] = [[] for _ in chats]
        self.decisions: dict[str, int] = {}
        self.tally = _Tally(ttft=[])
        self.window = _steady_window(chats)
        self._events: list[tuple[float, int, int, int, int]] = []
        self._order = 0

    def run(self) -> float:
        """Play every conversation to its end; the time the last step ends."""
        for index, chat in enumerate(self.chats):
            self._push(chat.start, _ARRIVAL, index, 0)
        now = 0.0
        while self._events:
            now, _, kind, first, second = heapq.heappop(self._events)
            if kind == _ARRIVAL:
                self._arrive(now, first, second)
            else:
                self._step_end(now, first)
        return now

    def _push(self, at: float, kind: int, first: int, second: int = 0) -> None:
        self._order += 1  # ties in time keep the order they were pushed in
        heapq.heappush(self._events, (at, self._order, kind, first, second))

    def _arrive(self, now: float, conversation: int, turn: int) -> None:
        """Route turn `turn` of `conversation` and queue it on its replica."""
        chat = self.chats[conversation]
        text = chat.texts[turn]
        loads = {index: node.in_flight for index, node in enumerate(self.nodes)}
        decision = self.policy.choose(text, loads, header=_header())
        self.policy.record(decision.replica, text)
        self.decisions[decision.kind] = self.decisions.get(decision.kind, 0) + 1
        index = int(decision.replica)
        self.placements[conversation].append(index)
        request = Request(conversation, turn, now, len(text))
        request.decode_left = chat.answer_tokens[turn] - 1  # the first token comes from the prompt's logits
        self.nodes[index].waiting.append(request)
        if not self.nodes[index].stepping:
            self._start(now, index)

    def _start(self, now: float, index: int) -> None:
        seconds, decoding = self.nodes[index].start_step()
        tally, window = self.tally, self.window
        tally.busy_s += seconds
        tally.busy_window_s += max(0.0, min(now + seconds, window[1]) - max(now, window[0]))
        if decoding:
            tally.decode_rows += decoding
            tally.decode_steps += 1
        self._push(now + seconds, _STEP_END, index)

    def _step_end(self, now: float, index: int) -> None:
        """Record first tokens, store finished histories, send the next turns, step again."""
        node = self.nodes[index]
        got_first, finished = node.finish_step()
        for request in got_first:
            self.tally.ttft.append((request.turn, request.arrival, now - request.arrival))
            self.tally.prompt_tokens += request.prompt
            self.tally.cached_tokens += request.cached
        for request in finished:
            chat = self.chats[request.conversation]
            node.cache.store(request.conversation, chat.resident_after[request.turn])
            following = request.turn + 1
            if following < len(chat.texts):
                self._push(now + chat.think_s[following], _ARRIVAL, request.conversation, following)
        if node.has_work():
            self._start(now, index)


def simulate(
    policy_name: str,
    *,
    replicas: int = 16,
    conversations: int = Workload.conversations,
    turns: int = Workload.turns,
    seed: int = 0,
    prefill_tokens_per_s: float = ReplicaModel.prefill_tokens_per_s,
    decode_tokens_per_s: float = ReplicaModel.decode_tokens_per_s,
    decode_slowdown: float = ReplicaModel.decode_slowdown,
    capacity_tokens: int = ReplicaModel.capacity_tokens,
    max_running: int = ReplicaModel.max_running,
    n_batch: int = ReplicaModel.n_batch,
    arrival_rate: float = Workload.arrival_rate,
    think_time_s: float = Workload.think_time_s,
    system_tokens: int = Workload.system_tokens,
    user_tokens: tuple[int, int] = Workload.user_tokens,
    answer_tokens: tuple[int, int] = Workload.answer_tokens,
) -> dict[str, Any]:
    """Run `conversations` chats of `turns` turns on `replicas` replicas routed by
    `policy_name` (one of `POLICIES`); the figures of `summarize` and the settings,
    JSON-serialisable. The same `seed` gives the same workload and results."""
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    model = ReplicaModel(
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_tokens_per_s=decode_tokens_per_s,
        decode_slowdown=decode_slowdown,
        capacity_tokens=capacity_tokens,
        max_running=max_running,
        n_batch=n_batch,
    )
    workload = Workload(
        conversations=conversations,
        turns=turns,
        system_tokens=system_tokens,
        user_tokens=(user_tokens[0], user_tokens[1]),
        answer_tokens=(answer_tokens[0], answer_tokens[1]),
        arrival_rate=arrival_rate,
        think_time_s=think_time_s,
    )
    chats, shared = make_workload(workload, seed)
    cluster = Cluster(chats, shared, make_policy(policy_name), model, replicas)
    makespan = cluster.run()
    result = summarize(policy_name, cluster, makespan)
    if isinstance(cluster.policy, PrefixAffinityPolicy):
        result["policy_settings"] = {
            "class": f"{PrefixAffinityPolicy.__module__}.{PrefixAffinityPolicy.__qualname__}",
            "min_match_chars": cluster.policy.min_match_chars,
            "max_imbalance": cluster.policy.max_imbalance,
        }
    settings = {
        "replicas": replicas,
        "seed": seed,
        "workload": asdict(workload) | {"shared_prefix_tokens": shared},
        "replica": asdict(model),
    }
    return result | {"settings": settings}


def _steady_window(chats: list[Conversation]) -> tuple[float, float]:
    """The middle half of the arrival period: from the start of the conversation a
    quarter of the way in to that of the one three quarters in."""
    if len(chats) < 4:
        return 0.0, 0.0
    return chats[len(chats) // 4].start, chats[3 * len(chats) // 4].start


def summarize(policy_name: str, cluster: Cluster, makespan: float) -> dict[str, Any]:
    """A run's figures: TTFT percentiles (all requests, first turns, later turns,
    requests sent while arrivals are steady), hit rate, conversations whose
    later turns stayed on one replica, utilisation, routing decisions."""
    tally, window, replicas = cluster.tally, cluster.window, len(cluster.nodes)
    ttft = [seconds for _, _, seconds in tally.ttft]
    later = [seconds for turn, _, seconds in tally.ttft if turn > 0]
    steady = [seconds for _, arrival, seconds in tally.ttft if window[0] <= arrival < window[1]]
    multi = [turns[1:] for turns in cluster.placements if len(turns) > 1]
    window_s = (window[1] - window[0]) * replicas
    return {
        "policy": policy_name,
        "requests": len(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
        "ttft_p50_first_turn_s": percentile([s for turn, _, s in tally.ttft if turn == 0], 50),
        "ttft_p50_later_turns_s": percentile(later, 50),
        "ttft_p99_later_turns_s": percentile(later, 99),
        "ttft_p50_steady_s": percentile(steady, 50),
        "ttft_p99_steady_s": percentile(steady, 99),
        "hit_rate": tally.cached_tokens / tally.prompt_tokens if tally.prompt_tokens else 0.0,
        "prompt_tokens": tally.prompt_tokens,
        "cached_tokens": tally.cached_tokens,
        "evaluated_prompt_tokens": tally.prompt_tokens - tally.cached_tokens,
        "one_replica_share": sum(len(set(turns)) == 1 for turns in multi) / len(multi) if multi else None,
        "utilisation": tally.busy_window_s / window_s if window_s > 0 else None,
        "utilisation_whole_run": tally.busy_s / (makespan * replicas) if makespan > 0 else 0.0,
        "mean_decode_batch": tally.decode_rows / tally.decode_steps if tally.decode_steps else 0.0,
        "makespan_s": makespan,
        "decisions": dict(sorted(cluster.decisions.items())),
    }


def percentile(values: list[float], q: float) -> float | None:
    """The `q`th percentile of `values`, interpolated linearly (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_all(**options: Any) -> dict[str, Any]:
    """`simulate` each policy of `POLICIES` with the same `options`:
    ``{"settings": ..., "policies": {name: results}}``."""
    policies = {}
    settings: dict[str, Any] = {}
    for name in POLICIES:
        result = simulate(name, **options)
        settings = result.pop("settings")
        policies[name] = result
    return {"settings": settings, "policies": policies}


# -- output -------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path | str) -> None:
    """A chart of `run_all`'s results: p50 and p99 TTFT per policy (log scale), and hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["policies"])
    rows = [results["policies"][name] for name in names]
    settings = results["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for offset, (key, label, color) in enumerate((("ttft_p50_s", "p50", "#4477aa"), ("ttft_p99_s", "p99", "#ee6677"))):
        values = [row[key] or 0.0 for row in rows]
        positions = [x + (offset - 0.5) * width for x in range(len(names))]
        bars = left.bar(positions, values, width, label=label, color=color)
        left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_yscale("log")
    left.set_xticks(range(len(names)), [name.replace("_", " ") for name in names])
    left.set_ylabel("time to first token (s)")
    left.legend()
    bars = right.bar(range(len(names)), [row["hit_rate"] * 100 for row in rows], 0.6, color="#228833")
    right.bar_label(bars, fmt="%.0f%%", fontsize=8)
    right.set_xticks(range(len(names)), [name.replace("_", " ") for name in names])
    right.set_ylabel("prompt tokens cached (%)")
    right.set_ylim(0, 100)
    workload = settings["workload"]
    fig.suptitle(
        f"Simulated: {settings['replicas']} replicas, {workload['conversations']} conversations of "
        f"{workload['turns']} turns (prefill {settings['replica']['prefill_tokens_per_s']:g} tok/s, "
        f"decode {settings['replica']['decode_tokens_per_s']:g} tok/s)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    """`run_all`'s results as a text table."""
    lines = [
        f"{'policy':>13} {'p50 TTFT':>9} {'p99 TTFT':>9} {'mean':>7} {'hit rate':>9} {'one replica':>12} "
        f"{'utilisation':>12} {'batch':>6}"
    ]
    for name, row in results["policies"].items():
        share = row["one_replica_share"]
        util = row["utilisation"]
        lines.append(
            f"{name:>13} {row['ttft_p50_s']:>8.2f}s {row['ttft_p99_s']:>8.2f}s {row['ttft_mean_s']:>6.2f}s "
            f"{row['hit_rate']:>9.1%} {'-' if share is None else format(share, '.1%'):>12} "
            f"{'-' if util is None else format(util, '.1%'):>12} {row['mean_decode_batch']:>6.1f}"
        )
    affinity = results["policies"].get("affinity")
    if affinity:
        lines.append(f"affinity decisions: {affinity['decisions']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, defaulting to `simulate`'s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=Workload.conversations)
    parser.add_argument("--turns", type=int, default=Workload.turns)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-tokens-per-s", type=float, default=ReplicaModel.prefill_tokens_per_s)
    parser.add_argument("--decode-tokens-per-s", type=float, default=ReplicaModel.decode_tokens_per_s)
    parser.add_argument("--decode-slowdown", type=float, default=ReplicaModel.decode_slowdown)
    parser.add_argument("--capacity-tokens", type=int, default=ReplicaModel.capacity_tokens)
    parser.add_argument("--arrival-rate", type=float, default=Workload.arrival_rate, help="conversations per second")
    parser.add_argument("--think-time-s", type=float, default=Workload.think_time_s)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--chart", type=Path, default=CHART)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Simulate the three policies, print the table, write the results and the chart."""
    args = parse_args(argv)
    options = {key: value for key, value in vars(args).items() if key not in ("json", "chart")}
    began = time.process_time()
    results = run_all(**options)
    cpu_s = time.process_time() - began
    print(table(results))
    print(f"simulated in {cpu_s:.1f} s of CPU")
    sys.path.insert(0, str(Path(__file__).parent))
    from machine_info import machine

    document = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "simulation_cpu_s": round(cpu_s, 2),
        **results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    plot(results, args.chart)
    print(f"wrote {args.json} and {args.chart}")


if __name__ == "__main__":
    main()
