"""Aggregate decode throughput of the engine against a bare llama_decode loop.

For K concurrent greedy streams (default 1, 4, 8, 16), both sides evaluate the
same K prompts, then decode the same number of tokens per stream, one token per
stream per step, in one batch per step:

- engine: K requests submitted at once to `kvchat.Engine`;
- bare loop: the same batch shapes through `llama_decode` directly, choosing each
  next token by argmax (the least a generation loop can do): the ceiling for
  this backend.

Each side runs `--repeats` times, alternating, and the best run counts (the
machines are shared and noisy). Prints a table and writes
benchmarks/results/throughput.json.

    python benchmarks/throughput.py [--model gemma-3-270m] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.llama import Batch, Context, ContextParams, Model
from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "throughput.json"


def prompts_for(model: Model, k: int) -> list[list[int]]:
    """K distinct prompts of the same length (16 tokens)."""
    out = []
    for i in range(k):
        tokens = model.tokenize(f"Story {i}: once upon a time, in a land far away, there lived", add_special=True)
        out.append((tokens * 2)[:16])
    return out


def bare_loop(
    ctx: Context, batch: Batch, prompts: list[list[int]], n_tokens: int, *, time_prefill: bool = True
) -> float:
    """Tokens per second of a plain prefill + greedy decode loop, sequence i in seq id i.

    The clock covers the prefill too unless `time_prefill` is False. Cells already
    in `ctx` stay (callers clear the memory when they want it empty).
    """
    batch.clear()
    start = time.perf_counter()
    rows = [batch.add_chunk(p, 0, seq, logits_last=True) for seq, p in enumerate(prompts)]
    ctx.decode(batch)
    if not time_prefill:
        start = time.perf_counter()
    positions = [len(p) for p in prompts]
    for _ in range(n_tokens):
        next_tokens = [int(np.argmax(ctx.logits(row))) for row in rows]
        batch.clear()
        rows = [batch.add(t, positions[seq], seq, logits=True) for seq, t in enumerate(next_tokens)]
        positions = [p + 1 for p in positions]
        ctx.decode(batch)
    elapsed = time.perf_counter() - start
    return len(prompts) * n_tokens / elapsed


def engine_run(engine: Engine, prompts: list[list[int]], n_tokens: int) -> tuple[float, int]:
    """Tokens per second of the engine serving the same prompts concurrently,
    and how many tokens it produced (fewer than K * n_tokens if a stream ended early)."""
    sampling = SamplingParams(temperature=0, max_tokens=n_tokens)
    start = time.perf_counter()
    streams = [engine.submit(p, sampling) for p in prompts]
    results = [s.collect() for s in streams]
    elapsed = time.perf_counter() - start
    produced = sum(r.usage.completion_tokens for r in results)
    return produced / elapsed, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speculation", choices=["off", "auto"], default="off",
                        help="the engine's speculation (off: the bare loop drafts nothing either)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    stream_counts = [int(k) for k in args.streams.split(",")]

    # The prefix cache is off: both sides evaluate every prompt token. Speculation is
    # off unless asked for: the bare loop decodes one token per stream per step.
    settings = EngineSettings(n_ctx=4096, max_running=max(stream_counts), n_seq_max=max(32, max(stream_counts)),
                              prefix_cache=False, speculation=args.speculation)
    model = Model(resolve(args.model))
    params = ContextParams(n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                           n_seq_max=settings.n_seq_max)
    rows = []
    with Engine(model, settings) as engine, Context(model, params) as ctx, Batch(params.n_batch) as batch:
        engine_run(engine, prompts_for(model, 2), 8)  # warm-up
        ctx.clear_memory()
        bare_loop(ctx, batch, prompts_for(model, 2), 8)
        for k in stream_counts:
            prompts = prompts_for(model, k)
            bare, eng = [], []
            for _ in range(args.repeats):
                ctx.clear_memory()
                bare.append(bare_loop(ctx, batch, prompts, args.tokens))
                rate, produced = engine_run(engine, prompts, args.tokens)
                if produced != k * args.tokens:
                    print(f"  note: K={k} engine produced {produced} tokens (some streams stopped early)")
                eng.append(rate)
            row = {"streams": k, "bare_tok_s": max(bare), "engine_tok_s": max(eng), "ratio": max(eng) / max(bare),
                   "bare_runs": bare, "engine_runs": eng}
            rows.append(row)
            print(f"K={k:>2}  bare {row['bare_tok_s']:7.1f} tok/s  engine {row['engine_tok_s']:7.1f} tok/s  "
                  f"ratio {row['ratio']:.3f}", flush=True)
    model.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model, "tokens_per_stream": args.tokens, "repeats": args.repeats,
        "settings": {"n_ctx": settings.n_ctx, "n_batch": settings.n_batch, "speculation": settings.speculation},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
