"""Helpers shared by the test modules (imported as `from helpers import ...`:
pytest's `pythonpath` puts tests/ on sys.path)."""

from __future__ import annotations

import time

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
