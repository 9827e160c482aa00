"""``/metrics`` of a kvchat application on Ray Serve: every replica's own metrics
(as its kvchat app exposes them) with a ``replica`` label, plus the ingress's
routing decisions by kind, retries and failures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from kvchat.server.ray_serve.router import RouterBook

__all__ = ["render_cluster_metrics"]


class _ClusterCollector:
    def __init__(self, book: RouterBook, retried: int, failed: int) -> None:
        self.book, self.retried, self.failed = book, retried, failed

    def collect(self) -> list[Metric]:
        merged: dict[str, Metric] = {}
        for replica, stats in sorted(self.book.stats.items()):
            for family in text_string_to_metric_families(str(stats.get("metrics", ""))):
                target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        decisions = CounterMetricFamily(
            "kvchat_routing_decisions", "Requests routed, by how the replica was chosen.", labels=["kind"]
        )
        for kind, count in sorted(self.book.decisions.items()):
            decisions.add_metric([kind], count)
        in_flight = GaugeMetricFamily(
            "kvchat_replica_requests_in_flight", "Requests routed to a replica and not finished.", labels=["replica"]
        )
        for replica, count in sorted(self.book.in_flight.items()):
            in_flight.add_metric([replica], count)
        return [
            *merged.values(),
            decisions,
            in_flight,
            GaugeMetricFamily("kvchat_replicas", "Replicas that published stats.", value=len(self.book.stats)),
            CounterMetricFamily(
                "kvchat_forward_retries", "Requests sent again after a replica failed.", value=self.retried
            ),
            CounterMetricFamily(
                "kvchat_forward_failures", "Requests that failed because replicas failed.", value=self.failed
            ),
        ]


def render_cluster_metrics(book: RouterBook, *, retried: int, failed: int) -> bytes:
    """The Prometheus text exposition of the whole application."""
    registry = CollectorRegistry()
    registry.register(_ClusterCollector(book, retried, failed))
    return generate_latest(registry)
