"""Helpers shared by the test modules (imported as `from helpers import ...`:
pytest's `pythonpath` puts tests/ on sys.path)."""

from __future__ import annotations

import time
from collections import Counter

from kvchat import Engine
from kvchat.chat.tool_calls import TextDelta, ToolCallEvent


def assert_idle(engine: Engine) -> None:
    """No request running or queued, no sequence or KV cell leaked."""
    stats = wait_idle(engine)
    assert stats.active == 0 and stats.queued == 0
    assert stats.free_sequences + stats.parked_sequences == engine.settings.n_seq_max
    assert stats.tokens_resident == stats.cache_tokens  # nothing held outside the cache
    assert stats.locked_cache_tokens == 0  # no cache node still locked by a finished request


def wait_idle(engine: Engine, timeout: float = 10.0):
    """The engine's stats once it has nothing running (stats lag a step behind)."""
    deadline = time.monotonic() + timeout
    stats = engine.stats()
    while (stats.active or stats.queued) and time.monotonic() < deadline:
        time.sleep(0.02)
        stats = engine.stats()
    return stats


def summary(events: list) -> list:
    """Tool-call parser events with adjacent text merged and calls as (name, arguments): ids are random."""
    out: list = []
    for event in events:
        if isinstance(event, TextDelta):
            assert event.text, "empty text delta"
            if out and isinstance(out[-1], str):
                out[-1] += event.text
            else:
                out.append(event.text)
        else:
            assert isinstance(event, ToolCallEvent)
            out.append((event.call.name, event.call.arguments))
    return out


# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_CRITICAL_0001 = {
    1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
    11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25, 17: 40.79, 18: 42.31, 19: 43.82, 20: 45.31,
}


def chi_square_homogeneity(a: Counter, b: Counter) -> tuple[float, int]:
    """Pearson's statistic for two samples over categories (those expected fewer
    than 5 times in either sample are pooled into one), and its degrees of freedom."""
    total_a, total_b = sum(a.values()), sum(b.values())
    total = total_a + total_b
    big, rest_a, rest_b = [], 0, 0
    for key in set(a) | set(b):
        column = a[key] + b[key]
        if min(column * total_a, column * total_b) / total >= 5:
            big.append((a[key], b[key]))
        else:
            rest_a, rest_b = rest_a + a[key], rest_b + b[key]
    if rest_a + rest_b:
        big.append((rest_a, rest_b))
    statistic = 0.0
    for count_a, count_b in big:
        column = count_a + count_b
        for count, row_total in ((count_a, total_a), (count_b, total_b)):
            expected = column * row_total / total
            statistic += (count - expected) ** 2 / expected
    return statistic, min(len(big) - 1, max(CHI2_CRITICAL_0001))
