"""Prometheus metrics of one server, in a registry of its own (``GET /metrics``).

Two sources:

- per-request observations made by the server: requests by endpoint and
  status, time to first token, time per output token;
- the engine's own snapshot (:meth:`Engine.stats`), read at scrape time: token
  counters (prompt, cached, evaluated, completion, drafted and accepted by
  speculative decoding), cache hit rate, resident tokens per tier, the n-gram
  cache's size, active and queued requests. The engine counts every request it
  ran, so these also cover work that did not come through HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvchat.engine import Engine, Usage

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Reads the engine's latest stats snapshot on every scrape."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        for name, value, doc in (
            ("prompt_tokens", stats.prompt_tokens, "Prompt tokens of finished requests."),
            ("cached_tokens", stats.cached_tokens, "Prompt tokens reused from the KV cache."),
            ("evaluated_tokens", stats.evaluated_tokens, "Prompt tokens run through the model."),
            ("completion_tokens", stats.completion_tokens, "Tokens generated."),
            ("draft_tokens", stats.draft_tokens, "Tokens drafted by speculative decoding and verified."),
            ("accepted_draft_tokens", stats.accepted_draft_tokens, "Drafted tokens that matched the output."),
            ("forced_tokens", stats.forced_tokens, "Generated tokens a grammar forced (no sampling step)."),
            ("cache_evictions", stats.evictions, "Cache entries evicted from the KV pool."),
            ("cache_spills", stats.spills, "Evicted cache entries whose state was copied to the RAM or disk tier."),
            ("cache_restores", stats.restores, "Spilled cache entries loaded back into the KV pool."),
            ("preemptions", stats.preemptions, "Running requests parked to make room for older ones (resumed later)."),
            (
                "cache_restore_failures",
                stats.restore_failures,
                "Spilled cache entries that could not be restored (their tokens were evaluated).",
            ),
        ):
            yield CounterMetricFamily(f"kvchat_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "kvchat_longest_step_seconds",
            "The longest engine step that ran the model since start (every running request waited that long).",
            value=stats.longest_step_seconds,
        )
        yield GaugeMetricFamily(
            "kvchat_cache_hit_rate", "Cached / prompt tokens since start.", value=stats.cache_hit_rate
        )
        yield GaugeMetricFamily(
            "kvchat_kv_cells_used", "KV cells in use (cache, conversations, running).", value=stats.tokens_resident
        )
        tiers = GaugeMetricFamily("kvchat_cache_resident_tokens", "Tokens held by each cache tier.", labels=["tier"])
        for tier, value in (("kv", stats.cache_tokens), ("ram", stats.ram_tokens), ("disk", stats.disk_tokens)):
            tiers.add_metric([tier], value)
        yield tiers
        tier_bytes = GaugeMetricFamily(
            "kvchat_cache_resident_bytes",
            "State bytes held by the RAM tier, file bytes by the disk tier.",
            labels=["tier"],
        )
        for tier, value in (("ram", stats.ram_bytes), ("disk", stats.disk_bytes)):
            tier_bytes.add_metric([tier], value)
        yield tier_bytes
        sequences = GaugeMetricFamily("kvchat_sequences", "KV sequence ids by state.", labels=["state"])
        for state, value in (
            ("free", stats.free_sequences),
            ("parked", stats.parked_sequences),
            ("active", stats.active),
        ):
            sequences.add_metric([state], value)
        yield sequences
        yield GaugeMetricFamily(
            "kvchat_cache_locked_tokens", "Cached tokens running requests depend on.", value=stats.locked_cache_tokens
        )
        yield GaugeMetricFamily(
            "kvchat_ngram_cache_entries", "Entries of speculation's n-gram cache.", value=stats.ngram_cache_entries
        )
        yield GaugeMetricFamily(
            "kvchat_ngram_cache_bytes",
            "Approximate bytes held by speculation's n-gram cache.",
            value=stats.ngram_cache_bytes,
        )
        yield GaugeMetricFamily("kvchat_requests_active", "Requests the engine is running.", value=stats.active)
        yield GaugeMetricFamily("kvchat_requests_queued", "Requests waiting for an engine slot.", value=stats.queued)


class ServerMetrics:
    """The metrics of one app; :meth:`render` gives the exposition text."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvchat_http_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kvchat_http_requests_in_flight", "Model requests being served over HTTP.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "kvchat_time_to_first_token_seconds",
            "From submitting a request to its first token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "kvchat_time_per_output_token_seconds",
            "Mean time between output tokens, per request.",
            buckets=_PER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def observe(self, usage: Usage, submitted_at: float, finished_at: float) -> None:
        """Record the latencies of a finished request (monotonic times)."""
        if usage.time_to_first_token is None:
            return
        self.time_to_first_token.observe(usage.time_to_first_token)
        if usage.completion_tokens > 1:
            decoding = finished_at - submitted_at - usage.time_to_first_token
            self.time_per_output_token.observe(max(decoding, 0.0) / (usage.completion_tokens - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
