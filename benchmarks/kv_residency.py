"""Does batched decode slow down with KV cells held by other sequences?

llama.cpp's unified KV cache lets every token's attention run over the cells
in use, other sequences' included (masked). This bare loop (no engine) decodes
K streams while other sequences hold R resident cells, for K in 1 and 8 and R
in 0, 4000 and 8000, on Qwen 0.5B.

    python benchmarks/kv_residency.py

Writes benchmarks/results/kv_residency.json.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from kvchat.llama import Batch, Context, ContextParams, Model
from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402
from throughput import bare_loop  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "kv_residency.json"
FILLER_CHUNK = 500


def decode_rate(model: Model, ctx: Context, batch: Batch, streams: int, resident: int, steps: int = 24) -> float:
    """Tokens per second of `streams` greedy streams while other sequences hold `resident` cells."""
    ctx.clear_memory()
    filler = model.tokenize("The quick brown fox jumps over the lazy dog. " * 60, add_special=True)[:FILLER_CHUNK]
    seq, left = 16, resident
    while left > 0:  # other sequences (ids 16 and up) hold the resident cells
        n = min(FILLER_CHUNK, left)
        batch.clear()
        batch.add_chunk(filler[:n], 0, seq, logits_last=False)
        ctx.decode(batch)
        left, seq = left - n, seq + 1
    prompts = [model.tokenize(f"Story {i}: once upon a time", add_special=True) for i in range(streams)]
    return bare_loop(ctx, batch, prompts, steps, time_prefill=False)


def main() -> None:
    model = Model(resolve("qwen2.5-coder-0.5b-instruct", progress=False))
    ctx = Context(model, ContextParams(n_ctx=16384, n_batch=512, n_ubatch=512, n_seq_max=32))
    batch = Batch(ctx.n_batch)
    rates = {}
    for streams in (1, 8):
        for resident in (0, 4000, 8000):
            rate = decode_rate(model, ctx, batch, streams, resident)
            rates[f"{streams} streams, {resident} resident cells"] = round(rate, 1)
            print(f"{streams} streams, {resident:>5} resident cells: {rate:6.1f} tok/s", flush=True)
    RESULTS.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "machine": machine(), "model": "qwen2.5-coder-0.5b-instruct",
                                   "tokens_per_second": rates}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
