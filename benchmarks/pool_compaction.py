"""Does moving parked entries out of the KV pool pay? (`EngineSettings.compact_pool`)

llama.cpp's attention reads the mask of every KV cell up to the highest one in
use, for every row of every decode call, so cells of parked conversations slow
down whatever runs, even when no running request uses them. With
`compact_pool`, each admission moves the parked entries the new request does not
use to the RAM tier; a later restore is a copy.

First, on a bare context: how long spilling (`llama_state_seq_get_data`) and
restoring (`..._set_data`) 1,000 tokens of one sequence take (median of 5).
Then one engine per setting (on, then off), Qwen 0.5B, 16,384-cell pool:
1. `fill`: 8 earlier conversations of about 1,200 tokens each are parked
   (about 9,600 cells), as on a server that has been chatting for a while;
2. `interleaved`: 8 new users whose turns interleave, one request at a time
   (median time to first token);
3. `concurrent`: 8 more users at once, each doing its turns one after another
   (aggregate completion tokens per second, wall time).

Every call sends the whole history as tokens (benchmarks/multiturn.py's
`Conversation`), greedy. Prints a table and writes
benchmarks/results/pool_compaction.json.

    python benchmarks/pool_compaction.py [--turns 4] [--answer-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.llama import Batch, Context, ContextParams, Model
from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402
from multiturn import Conversation  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pool_compaction.json"
MODEL = "qwen2.5-coder-0.5b-instruct"
USERS = 8
FILL_TOKENS = 1200


def state_copy_ms(model: Model, tokens: int = 1000, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds to copy one sequence's KV state out of the pool and back in."""
    text = model.tokenize("The harbour master kept a careful log. " * 200, add_special=True)[:tokens]
    with Context(model, ContextParams(n_ctx=4096, n_batch=512)) as ctx, Batch(512) as batch:
        for start in range(0, tokens, 512):
            batch.clear()
            batch.add_chunk(text[start:start + 512], start, 0, logits_last=False)
            ctx.decode(batch)
        spill, restore = [], []
        for _ in range(repeats):
            began = time.perf_counter()
            state = ctx.seq_state(0)
            spill.append(time.perf_counter() - began)
            began = time.perf_counter()
            ctx.set_seq_state(1, state)
            restore.append(time.perf_counter() - began)
            ctx.seq_remove(1)
    return {"tokens": tokens, "state_bytes": len(state), "spill_ms": statistics.median(spill) * 1000,
            "restore_ms": statistics.median(restore) * 1000}


def fill(engine: Engine, model: Model) -> None:
    """Park USERS earlier conversations of FILL_TOKENS tokens each."""
    text = "The harbour master kept a careful log of every boat that came and went. "
    for user in range(USERS):
        tokens = model.tokenize(f"Earlier conversation {user}. " + text * 100, add_special=True)[:FILL_TOKENS]
        engine.submit(tokens, SamplingParams(temperature=0, max_tokens=1)).collect()


def interleaved(engine: Engine, model: Model, turns: int, answer_tokens: int) -> dict[str, float]:
    conversations = [Conversation(model, 100 + u) for u in range(USERS)]
    calls = [c.ask(engine, turn, answer_tokens) for turn in range(1, turns + 1) for c in conversations]
    return {"ttft_p50_s": statistics.median(c["ttft_s"] for c in calls),
            "ttft_last_turn_s": statistics.median(c["ttft_s"] for c in calls[-USERS:])}


def concurrent(engine: Engine, model: Model, turns: int, answer_tokens: int) -> dict[str, float]:
    def converse(user: int) -> list[dict[str, float]]:
        conversation = Conversation(model, 200 + user)
        return [conversation.ask(engine, turn, answer_tokens) for turn in range(1, turns + 1)]

    began = time.perf_counter()
    with ThreadPoolExecutor(USERS) as pool:
        calls = [call for calls in pool.map(converse, range(USERS)) for call in calls]
    wall = time.perf_counter() - began
    completion = sum(c["completion_tokens"] for c in calls)
    return {"wall_s": wall, "completion_tokens": completion, "tokens_per_s": completion / wall,
            "ttft_p50_s": statistics.median(c["ttft_s"] for c in calls)}


def run(model: Model, compact: bool, turns: int, answer_tokens: int) -> dict[str, object]:
    settings = EngineSettings(n_ctx=16384, max_running=16, n_seq_max=32, compact_pool=compact)
    with Engine(model, settings) as engine:
        fill(engine, model)
        row: dict[str, object] = {"interleaved": interleaved(engine, model, turns, answer_tokens)}
        row["concurrent"] = concurrent(engine, model, turns, answer_tokens)
        stats = asdict(engine.stats())
        row["engine"] = {k: stats[k] for k in ("evictions", "spills", "restores", "cache_tokens", "ram_tokens")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    model = Model(resolve(MODEL, progress=False))
    copy = state_copy_ms(model)
    print(f"state copy of {copy['tokens']} tokens ({copy['state_bytes'] / 1e6:.1f} MB): "
          f"spill {copy['spill_ms']:.1f} ms, restore {copy['restore_ms']:.1f} ms", flush=True)
    results: dict[str, object] = {}
    for compact in (True, False):
        label = "on" if compact else "off"
        results[label] = run(model, compact, args.turns, args.answer_tokens)
        print(f"compact_pool {label}: {json.dumps(results[label])}", flush=True)
    on, off = results["on"], results["off"]
    ratios = {
        "interleaved_ttft_p50_on_over_off": on["interleaved"]["ttft_p50_s"] / off["interleaved"]["ttft_p50_s"],
        "concurrent_tok_s_on_over_off": on["concurrent"]["tokens_per_s"] / off["concurrent"]["tokens_per_s"],
    }
    print(f"\n{'':<34}{'on':>10}{'off':>10}")
    for scenario, key in (("interleaved", "ttft_p50_s"), ("concurrent", "tokens_per_s"), ("concurrent", "wall_s")):
        print(f"{scenario + ' ' + key:<34}{on[scenario][key]:>10.3f}{off[scenario][key]:>10.3f}")
    print(f"ratios: {json.dumps({k: round(v, 3) for k, v in ratios.items()})}")
    RESULTS.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "model": MODEL,
        "settings": {"users": USERS, "turns": args.turns, "answer_tokens": args.answer_tokens,
                     "fill_tokens": FILL_TOKENS, "n_ctx": 16384},
        "state_copy": copy, "results": results, "ratios": ratios,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
