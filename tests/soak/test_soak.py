"""Soak: 32 streaming clients against a real `kvchat serve`, about 150 requests
with random disconnects, edits, `max_tokens` and stop strings. At the end the
server is idle with nothing leaked, its memory stayed flat, and its metrics
match what the clients saw. (benchmarks/soak.py runs the same for longer.)"""

from __future__ import annotations

import asyncio
import os

import pytest
from http_server import ServeProcess
from soak.driver import SoakConfig, resident_bytes, run_soak, wait_until_idle

pytestmark = pytest.mark.system  # child processes (see tests/conftest.py)

MODEL = "gemma-3-270m"
PARALLEL = 16
REQUESTS = int(os.environ.get("KVCHAT_SOAK_REQUESTS", "80"))
REPLY_TOKENS = (1, 12)  # max_tokens drawn per request (the soak is about many requests, not long ones)
WARM_UP = 64  # enough to fill the KV pool (2048 cells) and the allocator: growth after it (net of the RAM tier) would be a leak
RAM_TIER_MIB = 16
CHAT_OK = ("kvchat_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
RAM_TIER_BYTES = ("kvchat_cache_resident_bytes", (("tier", "ram"),))


def test_soak(tmp_path) -> None:
    server = ServeProcess("--model", MODEL, "--parallel", str(PARALLEL), "--ctx-size", "2048", "--max-tokens", "64",
                          "--cache-ram", f"{RAM_TIER_MIB}M", "--no-access-log", log_path=str(tmp_path / "serve.log"))
    with server:
        config = SoakConfig(server.url, MODEL, clients=32, requests=WARM_UP, max_tokens=REPLY_TOKENS, seed=1)
        asyncio.run(run_soak(config))  # warm-up: the KV pool, the RAM tier and the allocator fill up
        before = wait_until_idle(server.url)
        # Steady state: entries were evicted from the pool and the RAM tier holds spilled state.
        assert before[("kvchat_cache_evictions_total", ())] > 0
        # Evicted state went to the RAM tier (each spill is an eviction's).
        assert 0 < before[("kvchat_cache_spills_total", ())] <= before[("kvchat_cache_evictions_total", ())]
        assert before[("kvchat_cache_resident_tokens", (("tier", "ram"),))] > 0
        rss_after_warm_up = resident_bytes(server.process.pid)

        config = SoakConfig(server.url, MODEL, clients=32, requests=REQUESTS, max_tokens=REPLY_TOKENS, seed=2)
        report = asyncio.run(run_soak(config))
        after = wait_until_idle(server.url)
        growth = resident_bytes(server.process.pid) - rss_after_warm_up
    # The RAM tier may still be filling up to its budget (--cache-ram) after the
    # warm-up: that growth is bounded by design, not a leak, so it is not counted.
    tier_growth = after[RAM_TIER_BYTES] - before[RAM_TIER_BYTES]
    print(f"\nsoak: {report.requests} requests in {report.seconds:.0f} s, {dict(report.outcomes)}, "
          f"{report.edits} edits, RSS growth {growth / 2**20:.1f} MiB (RAM tier {tier_growth / 2**20:+.1f} MiB)")

    # Every request either completed or was dropped by its client; no 5xx, no error event.
    assert report.requests == REQUESTS
    assert set(report.outcomes) <= {"completed", "disconnected"}, report.problems
    assert report.outcomes["disconnected"] > 0 and report.outcomes["completed"] > REQUESTS // 2
    assert report.edits > 0

    # Idle, nothing leaked: no running sequence, every id free or parked, no locked cache node.
    assert after[("kvchat_requests_active", ())] == after[("kvchat_requests_queued", ())] == 0
    assert after[("kvchat_http_requests_in_flight", ())] == 0
    assert after[("kvchat_sequences", (("state", "active"),))] == 0
    free, parked = after[("kvchat_sequences", (("state", "free"),))], after[("kvchat_sequences", (("state", "parked"),))]
    assert free + parked == 2 * PARALLEL  # kvchat serve makes n_seq_max = 2 x --parallel
    assert after[("kvchat_cache_locked_tokens", ())] == 0

    assert 0 < after[RAM_TIER_BYTES] <= RAM_TIER_MIB * 2**20
    assert growth - tier_growth < 50 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"

    # The server counted what the clients saw.
    assert after[CHAT_OK] - before[CHAT_OK] == report.statuses[200] == REQUESTS
    server_completion = after[("kvchat_completion_tokens_total", ())] - before[("kvchat_completion_tokens_total", ())]
    assert server_completion >= report.completion_tokens > 0  # dropped streams generated some too
    ttft_count = ("kvchat_time_to_first_token_seconds_count", ())
    assert after[ttft_count] - before[ttft_count] >= report.outcomes["completed"]
