"""Scale-out on Ray Serve: prefix-affinity routing against Ray Serve's default router.

On this machine, in one run: a local Ray instance, the kvchat application with
2 replicas (one CPU each) and, for reference, with 1 replica. 8 conversations
run at once (one client thread each, so their turns interleave), 8 turns each,
the whole history on every call, through the official `openai` client, once
per configuration:

- `single`: 1 replica (every conversation's cache on one engine);
- `affinity`: 2 replicas, kvchat's `PrefixAffinityRouter`;
- `default`: 2 replicas, Ray Serve's default router (power of two choices by
  queue length), with the same bookkeeping.

Figures: cache hit rate (cached / prompt tokens over all calls), the share of
conversations whose turns after the first were all served by one replica,
mean and p90 time to first token. Targets: affinity's hit rate at least 0.95x
the single replica's, clearly above the default router's; every conversation
on one replica after its first turn.

Past this machine it runs the simulation (benchmarks/scale_out_simulation.py:
16 replicas, 512 conversations, the same `PrefixAffinityPolicy`).

Writes benchmarks/results/scale_out.json (and the simulation's own files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import openai
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine
from multiturn import user_message
from scale_out_simulation import main as simulate_cluster

from kvchat.engine import EngineSettings
from kvchat.server import ServerSettings
from kvchat.server.ray_serve.app import build_app

RESULTS = Path(__file__).parent / "results" / "scale_out.json"
PORT = 8790


def run_conversations(url: str, model: str, conversations: int, turns: int, max_tokens: int) -> list[dict[str, Any]]:
    """Every conversation in its own thread; one record per call."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def converse(index: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
        messages: list[dict[str, str]] = [
            {"role": "system", "content": f"You are assistant number {index}. Answer briefly and concretely."}
        ]
        for turn in range(turns):
            messages.append({"role": "user", "content": user_message(index, turn)})
            start = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            first = None
            answer = []
            usage = None
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    answer.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            assert usage is not None and usage.prompt_tokens_details is not None
            messages.append({"role": "assistant", "content": "".join(answer)})
            with lock:
                records.append(
                    {
                        "conversation": index,
                        "turn": turn,
                        "replica": raw.headers.get("x-kvchat-replica"),
                        "prompt_tokens": usage.prompt_tokens,
                        "cached_tokens": usage.prompt_tokens_details.cached_tokens or 0,
                        "time_to_first_token": (first or time.perf_counter()) - start,
                    }
                )

    threads = [threading.Thread(target=converse, args=(index,)) for index in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    prompt = sum(record["prompt_tokens"] for record in records)
    cached = sum(record["cached_tokens"] for record in records)
    by_conversation: dict[int, set[str]] = {}
    for record in records:
        if record["turn"] > 0:
            by_conversation.setdefault(record["conversation"], set()).add(record["replica"])
    ttft = sorted(record["time_to_first_token"] for record in records)
    return {
        "calls": len(records),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "conversations_on_one_replica": sum(len(replicas) == 1 for replicas in by_conversation.values())
        / max(1, len(by_conversation)),
        "replicas_used": len({record["replica"] for record in records}),
        "ttft_mean": statistics.fmean(ttft),
        "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
    }


def run_configuration(
    name: str, *, model: str, replicas: int, routing: str, conversations: int, turns: int, max_tokens: int
) -> dict[str, Any]:
    app = build_app(
        model,
        server_settings=ServerSettings(model_name=model),
        engine_settings=EngineSettings(n_ctx=8192, max_running=8, n_seq_max=16, n_threads=1),
        num_replicas=replicas,
        routing=routing,  # type: ignore[arg-type]
    )
    serve.run(app, name="kvchat", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"
    started = time.perf_counter()
    records = run_conversations(url, model, conversations, turns, max_tokens)
    summary = {"configuration": name, "replicas": replicas, "routing": routing, **summarize(records)}
    summary["wall_s"] = time.perf_counter() - started
    print(
        f"{name:>9}: hit rate {summary['hit_rate']:.3f}, on one replica {summary['conversations_on_one_replica']:.2f}, "
        f"TTFT mean {summary['ttft_mean']:.2f}s p90 {summary['ttft_p90']:.2f}s, {summary['wall_s']:.0f}s",
        flush=True,
    )
    serve.delete("kvchat")
    return {"summary": summary, "calls": records}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    options = {
        "model": args.model,
        "conversations": args.conversations,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
    }
    try:
        runs = {
            "single": run_configuration("single", replicas=1, routing="prefix", **options),
            "affinity": run_configuration("affinity", replicas=2, routing="prefix", **options),
            "default": run_configuration("default", replicas=2, routing="default", **options),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    single, affinity, default = (runs[name]["summary"] for name in ("single", "affinity", "default"))
    figures = {
        "affinity_over_single_hit_rate": affinity["hit_rate"] / single["hit_rate"],
        "affinity_over_default_hit_rate": affinity["hit_rate"] / max(default["hit_rate"], 1e-9),
        "target_affinity_over_single": 0.95,
        "every_conversation_on_one_replica": affinity["conversations_on_one_replica"] == 1.0,
    }
    print(json.dumps(figures, indent=2))
    simulate_cluster([])  # writes benchmarks/results/scale_out_simulation.json and its chart
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(),
                "options": options,
                "figures": figures,
                "runs": runs,
                "simulation": "benchmarks/results/scale_out_simulation.json",
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
