"""Chat decode next to embeddings in one process: does the embedding thread slow the engine?

llama.cpp's CPU backend (built with OpenMP) gives every thread that runs a
decode an OpenMP team, kept while the thread lives; with two teams in the
process, libgomp manages more threads than there are cores and throttles the
spinning of ggml's barriers, so every decode synchronises its threads more
slowly. An engine's worker thread is one such thread; an embedding thread that
stays alive (a pooled thread, as `asyncio.to_thread` uses) is a second.

One engine (speculation off) decodes 128 tokens after a code-edit prompt,
several times in each state, in cycles so that the machine's drift hits all
states alike:

- `before`: no embedding has run yet in the cycle;
- `live_thread`: after an embedding on a thread that is still alive;
- `thread_ended`: after that thread has ended;
- `embedding_worker`: after a job of `kvchat serve`'s `EmbeddingWorker` (its
  thread ends when no job waits);
- `embed_async`: after `Embedder.embed_async` (a thread that ends with the call).

Writes benchmarks/results/embedding_interference.json.

    python benchmarks/embedding_interference.py [--cycles 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from code_edit_tasks import TASKS
from machine_info import machine
from speculative import edit_messages
from stream_timing import decode_span

from kvchat import Engine, EngineSettings
from kvchat.chat import ChatTokenizer
from kvchat.engine import SamplingParams
from kvchat.engine.embedder import Embedder
from kvchat.llama import Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve
from kvchat.server.embedding_worker import EmbeddingWorker

RESULTS = Path(__file__).parent / "results" / "embedding_interference.json"
TEXTS = ["The quarterly earnings report exceeded analyst expectations."] * 4


def decode_rate(engine: Engine, prompt: list[int], tokens: int) -> float:
    """Tokens after the first over the time from the first to the last."""
    count, seconds = decode_span(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=tokens)))
    return count / seconds if seconds > 0 else 0.0


class LiveThread:
    """A thread that embeds on request and stays alive between requests."""

    def __init__(self, embedder: Embedder) -> None:
        self.jobs: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, args=(embedder,), daemon=True)
        self.thread.start()

    def _run(self, embedder: Embedder) -> None:
        while (texts := self.jobs.get()) is not None:
            self.done.put(embedder.embed(texts))

    def embed(self, texts: list[str]) -> None:
        self.jobs.put(texts)
        self.done.get()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    model = Model(resolve(args.model))
    task = TASKS[0]
    prompt = ChatTokenizer(model).encode(edit_messages(task))
    rates: dict[str, list[float]] = {}

    def measure(state: str) -> None:
        for _ in range(args.reps):
            rates.setdefault(state, []).append(decode_rate(engine, prompt, args.tokens))
        print(f"  {state:>16}: {statistics.median(rates[state][-args.reps:]):.1f} tok/s", flush=True)

    with Engine(model, EngineSettings(n_ctx=8192, speculation="off")) as engine, Embedder(model) as embedder:
        worker = EmbeddingWorker(lambda: embedder)

        async def through_worker() -> None:
            await worker.submit(TEXTS, max_tokens=10_000).result()

        for cycle in range(1, args.cycles + 1):
            print(f"cycle {cycle}")
            measure("before")
            live = LiveThread(embedder)
            live.embed(TEXTS)
            measure("live_thread")
            live.stop()
            measure("thread_ended")
            asyncio.run(through_worker())
            while worker.running:
                time.sleep(0.01)
            measure("embedding_worker")
            asyncio.run(embedder.embed_async(TEXTS))
            time.sleep(0.05)  # the call's thread ends right after handing its result over
            measure("embed_async")
        worker.close()  # closes the embedder too (closing twice is harmless)
    model.close()

    medians = {state: statistics.median(values) for state, values in rates.items()}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "tokens": args.tokens,
        "decode_tok_s": medians,
        "over_before": {state: rate / medians["before"] for state, rate in medians.items()},
        "samples": rates,
    }
    print("\n" + "\n".join(f"{state:>16}: {rate:.1f} tok/s ({results['over_before'][state]:.2f}x before)"
                           for state, rate in medians.items()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
