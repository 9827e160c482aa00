"""What one prompt chunk costs llama.cpp, by its rows and the history it attends to
(bare loop, no engine).

A chat turn that hits the prefix cache evaluates only its new tokens in one
`llama_decode` call, so its time to first token is this cost. The table shows
what that leaves to the engine:
- the cost grows with the cached history (attention), which sets a floor under
  the multi-turn benchmark's TTFT growth target (turn 16 over turn 2);
- it jumps at 64 rows: llama.cpp's CPU flash attention computes calls of 64 rows
  or more in 64x64 tiles, each padded to 64 rows and cut at the threads' chunk
  boundaries, and calls below 64 rows row by row (slower per row, but able to
  skip cells the mask hides).

It also times 80 new tokens sent as one call or split into two, and prints the
backend's ratio for the exact call shapes of benchmarks/multiturn.py (tokens
and chat modes, read from its results files): one call of the turn's new
tokens on top of the turn-2 and turn-16 histories.

    python benchmarks/prefill_shape.py [--model qwen2.5-coder-0.5b-instruct]

Writes benchmarks/results/prefill_shape.json (best of 3 per cell, ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from kvchat.llama import Batch, Context, ContextParams, Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "prefill_shape.json"
ROWS = (48, 63, 64, 65, 72, 80, 86, 96, 128)
HISTORIES = (0, 1000, 2400)
SPLITS = ((80,), (64, 16), (40, 40))
MULTITURN_RESULTS = {"tokens": "multiturn.json", "chat": "multiturn_chat.json"}


def multiturn_shapes() -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Per mode, the (cached, evaluated) tokens of the second and the last turn of
    multiturn.py's single conversation with the cache on, from its results files."""
    shapes = {}
    for mode, name in MULTITURN_RESULTS.items():
        turns = json.loads((RESULTS.parent / name).read_text())["single_cache_on"]
        shapes[mode] = tuple((t["cached_tokens"], t["evaluated_tokens"]) for t in (turns[1], turns[-1]))
    return shapes


def synthetic_tokens(n: int) -> list[int]:
    """`n` ordinary token ids (the cost of a call does not depend on which)."""
    return [(i * 7919) % 20000 + 100 for i in range(n)]


def chunk_ms(ctx: Context, batch: Batch, tokens: list[int], cached: int, rows: int | tuple[int, ...],
             repeats: int = 3) -> float:
    """Best time of evaluating `rows` tokens after `cached` resident ones (the
    history must already be in sequence 0), in one call or in calls of the given sizes."""
    calls = (rows,) if isinstance(rows, int) else rows
    best = float("inf")
    for _ in range(repeats):
        ctx.seq_remove(0, cached, -1)
        began = time.perf_counter()
        position = cached
        for i, size in enumerate(calls):
            batch.clear()
            batch.add_chunk(tokens[position:position + size], position, 0, logits_last=i == len(calls) - 1)
            ctx.decode(batch)
            position += size
        best = min(best, time.perf_counter() - began)
    return best * 1000


def fill(ctx: Context, batch: Batch, tokens: list[int], cached: int) -> None:
    """Sequence 0 holds `cached` tokens in contiguous cells, nothing else is resident."""
    ctx.clear_memory()
    for start in range(0, cached, batch.capacity):
        batch.clear()
        batch.add_chunk(tokens[start:min(cached, start + batch.capacity)], start, 0, logits_last=False)
        ctx.decode(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    args = parser.parse_args()
    model = Model(resolve(args.model, progress=False))
    tokens = synthetic_tokens(max(HISTORIES) + max(ROWS) + 64)
    grid: dict[str, dict[str, float]] = {}
    splits: dict[str, dict[str, float]] = {}
    shapes: dict[str, dict[str, float]] = {}
    with Context(model, ContextParams(n_ctx=4096, n_batch=512, n_seq_max=4)) as ctx, Batch(512) as batch:
        print(f"{'history':>8} " + " ".join(f"{r:>6}" for r in ROWS) + "   (rows per call; ms)")
        for cached in HISTORIES:
            fill(ctx, batch, tokens, cached)
            grid[str(cached)] = {str(r): round(chunk_ms(ctx, batch, tokens, cached, r), 1) for r in ROWS}
            print(f"{cached:>8} " + " ".join(f"{grid[str(cached)][str(r)]:>6.0f}" for r in ROWS), flush=True)
        print("\n80 new tokens in one call or two (ms)")
        for cached in (HISTORIES[0], HISTORIES[-1]):
            fill(ctx, batch, tokens, cached)
            splits[str(cached)] = {"+".join(map(str, c)): round(chunk_ms(ctx, batch, tokens, cached, c), 1)
                                   for c in SPLITS}
            print(f"{cached:>8} " + ", ".join(f"{k}: {v:.0f}" for k, v in splits[str(cached)].items()), flush=True)
        print("\nmultiturn.py's turns as one bare call each")
        for mode, ((c2, n2), (c16, n16)) in multiturn_shapes().items():
            fill(ctx, batch, tokens, c2)
            turn_2 = chunk_ms(ctx, batch, tokens, c2, n2)
            fill(ctx, batch, tokens, c16)
            turn_16 = chunk_ms(ctx, batch, tokens, c16, n16)
            shapes[mode] = {"turn_2_ms": round(turn_2, 1), "turn_16_ms": round(turn_16, 1),
                            "turn_16_over_turn_2": round(turn_16 / turn_2, 3)}
            print(f"  {mode:>6}: turn 2 ({n2} after {c2}) {turn_2:.0f} ms, turn 16 ({n16} after {c16}) "
                  f"{turn_16:.0f} ms: {turn_16 / turn_2:.2f}x", flush=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": args.model, "ms_by_history_and_rows": grid, "ms_80_tokens_by_calls": splits,
        "multiturn_turns": shapes,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
