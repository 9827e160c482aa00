"""benchmarks/scale_out_simulation.py: the cluster simulation behind the scale-out
figures, on small configurations (no model, well under a second each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from kvchat.server.ray_serve.policy import PrefixAffinityPolicy

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import scale_out_simulation as sim

SMALL: dict[str, Any] = {"replicas": 4, "conversations": 24, "turns": 4}


def test_affinity_caches_more_than_round_robin_and_least_loaded() -> None:
    # Enough traffic that each replica holds only some of the conversations.
    options = SMALL | {"capacity_tokens": 4_000, "arrival_rate": 1.0}
    affinity = sim.simulate("affinity", **options)
    for other in ("round_robin", "least_loaded"):
        baseline = sim.simulate(other, **options)
        assert affinity["hit_rate"] > baseline["hit_rate"] + 0.1, other
        assert affinity["evaluated_prompt_tokens"] < baseline["evaluated_prompt_tokens"], other


def test_affinity_keeps_each_conversation_on_one_replica_under_light_load() -> None:
    result = sim.simulate("affinity", **SMALL, arrival_rate=0.02)
    assert result["one_replica_share"] == 1.0
    assert result["decisions"].get("overloaded", 0) == 0
    # Every later turn finds its whole history: only the new message (and the
    # separators before it) is evaluated.
    assert result["hit_rate"] > 0.8


def test_results_are_deterministic_for_a_seed() -> None:
    first = sim.run_all(**SMALL, seed=3)
    again = sim.run_all(**SMALL, seed=3)
    other = sim.run_all(**SMALL, seed=4)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert first["policies"]["affinity"]["prompt_tokens"] != other["policies"]["affinity"]["prompt_tokens"]


def test_one_replica_with_room_for_everything_makes_the_policies_equal() -> None:
    results = sim.run_all(**SMALL | {"replicas": 1, "capacity_tokens": 10**7})
    rows = list(results["policies"].values())
    assert len({row["hit_rate"] for row in rows}) == 1
    assert len({row["ttft_p50_s"] for row in rows}) == 1
    # Only first turns miss, and they still find the shared system prompt after the first.
    assert rows[0]["hit_rate"] > 0.7


def test_the_affinity_run_routes_with_the_real_policy() -> None:
    result = sim.simulate("affinity", **SMALL)
    requests = SMALL["conversations"] * SMALL["turns"]
    # The cluster counts one decision per `choose` of its policy: every request was routed
    # once, by a PrefixAffinityPolicy ("prefix" and "pinned" are its own kinds).
    assert result["requests"] == sum(result["decisions"].values()) == requests
    assert set(result["decisions"]) <= {"pinned", "prefix", "overloaded", "least_loaded"}
    assert result["decisions"]["prefix"] > 0
    real = f"{PrefixAffinityPolicy.__module__}.{PrefixAffinityPolicy.__qualname__}"
    assert real.endswith("policy.PrefixAffinityPolicy") and result["policy_settings"]["class"] == real
    robin = sim.simulate("round_robin", **SMALL)
    assert robin["decisions"] == {"round_robin": requests} and "policy_settings" not in robin


def test_a_lone_request_costs_its_prompt_at_the_prefill_rate() -> None:
    result = sim.simulate("round_robin", replicas=1, conversations=1, turns=1, prefill_tokens_per_s=100.0)
    assert result["cached_tokens"] == 0
    assert result["ttft_p50_s"] == pytest.approx(result["prompt_tokens"] / 100.0)


def test_a_second_turn_reuses_the_first_turns_prompt_and_answer() -> None:
    workload = sim.Workload(conversations=1, turns=2)
    (chat,), _ = sim.make_workload(workload, seed=0)
    assert chat.texts[1].startswith(chat.texts[0])
    result = sim.simulate("affinity", replicas=2, conversations=1, turns=2)
    assert result["cached_tokens"] == chat.resident_after[0]
    assert result["one_replica_share"] == 1.0


def test_conversations_share_exactly_the_system_prefix() -> None:
    chats, shared = sim.make_workload(sim.Workload(conversations=2, turns=1), seed=0)
    first, second = chats[0].texts[0], chats[1].texts[0]
    assert first[:shared] == second[:shared]
    assert shared > sim.Workload.system_tokens


def test_replica_cache_evicts_least_recently_used_unpinned_conversations() -> None:
    cache = sim.ReplicaCache(capacity=100, shared=10)
    cache.store(1, 50)
    cache.store(2, 50)
    assert cache.held == 10 + 40 + 40
    cache.pinned.add(1)
    cache.store(3, 40)  # over capacity: 1 is pinned, so 2 goes
    assert (cache.cached(1), cache.cached(2), cache.cached(3)) == (50, 10, 40)
    cache.pinned.clear()
    cache.store(1, 80)  # 3 is now the least recently used
    assert (cache.cached(1), cache.cached(3)) == (80, 10)
    assert cache.held == 80


def test_baseline_policies() -> None:
    least = sim.LeastLoadedPolicy()
    assert least.choose("", {0: 2, 1: 0, 2: 1}).replica == 1
    assert {least.choose("", {0: 0, 1: 0}).replica for _ in range(2)} == {0, 1}
    robin = sim.RoundRobinPolicy()
    assert [robin.choose("", {0: 9, 1: 0, 2: 0}).replica for _ in range(4)] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="unknown policy"):
        sim.make_policy("random")


def test_plot_and_main_write_their_files(tmp_path: Path) -> None:
    chart, results = tmp_path / "chart.png", tmp_path / "results.json"
    sim.main(["--replicas", "2", "--conversations", "6", "--turns", "2", "--json", str(results), "--chart", str(chart)])
    written = json.loads(results.read_text())
    assert set(written["policies"]) == set(sim.POLICIES)
    assert chart.read_bytes().startswith(b"\x89PNG")
