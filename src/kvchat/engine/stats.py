"""`EngineStats` and `StatsBoard`: what the engine reports about itself."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, fields

from kvchat.engine.kv_pool import KVPool
from kvchat.engine.scheduler import Scheduler
from kvchat.engine.stream import Usage


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, taken by its worker thread after each change.

    `active`: requests admitted (prefilling or generating); `queued`: waiting for
    a sequence; `free_sequences`: KV sequence ids neither running nor parked;
    `parked_sequences`: ids holding prefix-cache entries; `tokens_resident`: KV
    cells in use (cache, conversations and running requests, shared cells once);
    `cache_tokens`, `ram_tokens`, `disk_tokens`: tokens held by each cache tier;
    `ram_bytes`, `disk_bytes`: the state bytes the RAM tier holds and the disk
    tier's file bytes;
    `locked_cache_tokens`: cached tokens that running requests depend on (not
    evictable; 0 when the engine is idle);
    `restore_failures`: spilled states chosen for a request that could not be
    loaded (a damaged file, or llama.cpp refused the bytes; the tokens were evaluated);
    `shifts`: context shifts that reused the original prompt's KV;
    `preemptions`: running requests parked to make room for older ones' tokens
    (they resumed later; see `Scheduler`);
    `ngram_cache_entries` and `ngram_cache_bytes`: the speculative n-gram cache's
    size; `draft_tokens` / `accepted_draft_tokens`: tokens drafted and verified
    for finished requests, and those that matched the output (see
    `acceptance_rate`); `forced_tokens`: completion tokens a grammar forced
    (appended without a sampling step); `longest_step_seconds`: the longest
    engine step that ran the model since start (see `Engine.step_timings`).
    Counters are cumulative since start; `cache_hit_rate` is cached / prompt tokens.
    """

    active: int
    queued: int
    free_sequences: int
    parked_sequences: int
    tokens_resident: int
    cache_tokens: int
    ram_tokens: int
    disk_tokens: int
    ram_bytes: int
    disk_bytes: int
    locked_cache_tokens: int
    evictions: int
    spills: int
    restores: int
    restore_failures: int
    shifts: int
    preemptions: int
    ngram_cache_entries: int
    ngram_cache_bytes: int
    steps: int
    requests_finished: int
    prompt_tokens: int
    cached_tokens: int
    evaluated_tokens: int
    completion_tokens: int
    draft_tokens: int
    accepted_draft_tokens: int
    forced_tokens: int
    longest_step_seconds: float

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that matched the output, since start (0 before any draft)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompt tokens taken from the cache, since start."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class RequestCounters:
    """Cumulative request and token counts."""

    steps: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    forced_tokens: int = 0
    longest_step_seconds: float = 0.0

    def count_finished(self, usage: Usage) -> None:
        """Add one finished request."""
        self.requests_finished += 1
        self.prompt_tokens += usage.prompt_tokens
        self.cached_tokens += usage.cached_tokens
        self.evaluated_tokens += usage.evaluated_tokens
        self.completion_tokens += usage.completion_tokens
        self.draft_tokens += usage.draft_tokens
        self.accepted_draft_tokens += usage.accepted_draft_tokens
        self.forced_tokens += usage.forced_tokens


@dataclass(frozen=True)
class StepTiming:
    """One engine step that ran the model: when it started (`time.perf_counter`), how
    long it took, and the worker thread's CPU time spent picking tokens in it
    (samplers and grammars, the work a request's options add to a step; unlike
    `seconds`, not stretched by other processes on a busy machine)."""

    started: float
    seconds: float
    sampling_cpu_seconds: float


RECENT_STEPS = 4_096
"""Step durations kept for `StatsBoard.step_timings`."""


class StatsBoard:
    """The worker thread writes snapshots here; any thread reads the latest."""

    def __init__(self) -> None:
        self.counters = RequestCounters()
        self._lock = threading.Lock()
        self._latest: EngineStats | None = None
        self._steps: deque[StepTiming] = deque(maxlen=RECENT_STEPS)

    def record_step(self, timing: StepTiming) -> None:
        """Note one step that ran the model."""
        self.counters.longest_step_seconds = max(self.counters.longest_step_seconds, timing.seconds)
        with self._lock:
            self._steps.append(timing)

    def step_timings(self) -> list[StepTiming]:
        """The latest steps that ran the model, oldest first."""
        with self._lock:
            return list(self._steps)

    def publish(self, scheduler: Scheduler, pool: KVPool, *, ngram_entries: int = 0, ngram_bytes: int = 0) -> None:
        """Take a snapshot of the worker's state (worker thread only)."""
        running, waiting = scheduler.running, scheduler.waiting
        store = pool.store.stats() if pool.store is not None else None
        snapshot = EngineStats(
            active=len(running),
            queued=len(waiting),
            free_sequences=pool.free_sequences,
            parked_sequences=pool.parked_sequences,
            tokens_resident=(
                pool.cached_tokens_resident + pool.pinned_cells + sum(s.n_past - s.shared_prefix for s in running)
            ),
            cache_tokens=pool.cached_tokens_resident,
            ram_tokens=store.ram_tokens if store else 0,
            disk_tokens=store.disk_tokens if store else 0,
            ram_bytes=store.ram_bytes if store else 0,
            disk_bytes=store.disk_bytes if store else 0,
            locked_cache_tokens=pool.cache.protected_tokens if pool.cache is not None else 0,
            evictions=pool.counters.evictions,
            spills=pool.counters.spills,
            restores=pool.counters.restores,
            restore_failures=pool.counters.restore_failures,
            shifts=pool.counters.shifts,
            preemptions=scheduler.preemptions,
            ngram_cache_entries=ngram_entries,
            ngram_cache_bytes=ngram_bytes,
            **{f.name: getattr(self.counters, f.name) for f in fields(self.counters)},
        )
        with self._lock:
            self._latest = snapshot

    def latest(self) -> EngineStats:
        """The most recent snapshot."""
        with self._lock:
            assert self._latest is not None, "the engine publishes a snapshot before it starts"
            return self._latest
