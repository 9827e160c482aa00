"""How should one step's tokens be split into llama_decode calls? (bare loop, no engine)

llama.cpp's CPU flash attention computes a call of 64 rows or more in 64x64
tiles and skips a tile only when the mask hides it from every row in it; below
64 rows each row skips hidden cells one by one. This measures, on Qwen 0.5B, an
80-token prompt chunk of sequence 0 after 1,000 cached tokens, with 7 other
sequences holding 1,000 tokens each:

- history `contiguous` (each sequence evaluated alone) or `interleaved` (the 8
  sequences evaluated together, token by token, as concurrent decoding leaves them);
- the chunk in one call (tiled kernel), in 2 calls of 40, in 4 calls of 20;
- 7 decode rows of the other sequences alone, and in the chunk's call.

step planner's rule follows from it (kvchat/engine/step_planner.py).

    python benchmarks/attention_calls.py

Writes benchmarks/results/attention_calls.json (median of 3 runs each, ms).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from kvchat.llama import Batch, Context, ContextParams, Model
from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "attention_calls.json"
HISTORY = 1000
SEQUENCES = 8
CHUNK = 80


class Bench:
    """One context with 8 sequences of HISTORY tokens each."""

    def __init__(self) -> None:
        self.model = Model(resolve("qwen2.5-coder-0.5b-instruct", progress=False))
        self.ctx = Context(self.model, ContextParams(n_ctx=16384, n_batch=512, n_ubatch=512, n_seq_max=32))
        self.batch = Batch(self.ctx.n_batch)
        self.text = self.model.tokenize("The quick brown fox jumps over the lazy dog. " * 200, add_special=True)

    def build(self, interleaved: bool) -> None:
        """Evaluate the 8 histories, either one sequence after another or token by token together."""
        ctx, batch, text = self.ctx, self.batch, self.text
        ctx.clear_memory()
        if interleaved:
            for start in range(0, HISTORY, 64):
                batch.clear()
                for pos in range(start, min(HISTORY, start + 64)):
                    for seq in range(SEQUENCES):
                        batch.add(text[pos], pos, seq, logits=False)
                ctx.decode(batch)
        else:
            for seq in range(SEQUENCES):
                for start in range(0, HISTORY, 500):
                    batch.clear()
                    batch.add_chunk(text[start : start + 500], start, seq, logits_last=False)
                    ctx.decode(batch)

    def timed(self, step: Callable[[], None], runs: int = 3) -> float:
        """Median milliseconds of `step`, the history trimmed back after each run."""
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            for seq in range(SEQUENCES):
                self.ctx.seq_remove(seq, HISTORY, -1)
        return round(statistics.median(times) * 1000, 1)

    def chunk_in_calls(self, rows: int, decoders: int = 0) -> Callable[[], None]:
        """The chunk in calls of `rows` tokens, each call also holding `decoders` decode rows."""
        chunk = self.text[:CHUNK]

        def step() -> None:
            for n, start in enumerate(range(0, CHUNK, rows)):
                self.batch.clear()
                for seq in range(1, decoders + 1):
                    self.batch.add(self.text[5], HISTORY + n, seq, logits=True)
                self.batch.add_chunk(chunk[start : start + rows], HISTORY + start, 0, logits_last=True)
                self.ctx.decode(self.batch)

        return step

    def decode_rows(self) -> None:
        self.batch.clear()
        for seq in range(1, SEQUENCES):
            self.batch.add(self.text[5], HISTORY, seq, logits=True)
        self.ctx.decode(self.batch)


def main() -> None:
    bench = Bench()
    results: dict[str, dict[str, float]] = {}
    for layout in ("contiguous", "interleaved"):
        bench.build(interleaved=layout == "interleaved")
        row = {
            "chunk in 1 call": bench.timed(bench.chunk_in_calls(CHUNK)),
            "chunk in 2 calls": bench.timed(bench.chunk_in_calls(CHUNK // 2)),
            "chunk in 4 calls": bench.timed(bench.chunk_in_calls(CHUNK // 4)),
            "7 decode rows alone": bench.timed(bench.decode_rows),
            "chunk + 7 decode rows in 1 call": bench.timed(bench.chunk_in_calls(CHUNK, decoders=SEQUENCES - 1)),
            "chunk in 2 calls, 7 decode rows in each": bench.timed(
                bench.chunk_in_calls(CHUNK // 2, decoders=SEQUENCES - 1)
            ),
        }
        results[layout] = row
        print(f"{layout} history:")
        for name, ms in row.items():
            print(f"  {name:<42} {ms:8.1f} ms", flush=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": "qwen2.5-coder-0.5b-instruct", "history_tokens": HISTORY, "sequences": SEQUENCES,
        "chunk_tokens": CHUNK, "median_ms": results,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
