"""Code edits on code nobody here wrote: kvchat against llama.cpp's own llama-server.

Tasks are drawn at random (seeded, printed) from functions of this machine's Python
standard library (benchmarks/stdlib_edit_tasks.py): rename a local variable, add a
parameter, add a docstring, change a constant; the answer rewrites the function, so
most of it repeats the prompt, which is where speculative decoding pays.

Each server is started fresh (nothing learned from an earlier run), on the same
model file, threads and context, and gets the same requests one at a time over
HTTP through the official `openai` client: greedy, streamed, the task's user
message alone. Servers:

- `kvchat`: `kvchat serve` at its defaults (speculation "auto");
- `kvchat-off`: `kvchat serve --speculation off` (the greedy reference text);
- `kvchat-prediction`: `kvchat serve`, each request carrying OpenAI's `prediction`
  (the function as pasted);
- `llama-server`: llama.cpp's server at its defaults (no speculation);
- `llama-server-spec`: the same with `--spec-default` (n-gram drafts of up to 64
  tokens); both built by benchmarks/llama_server.py on first use.

Per task and server: decode tokens/s (the completion tokens after the first
content chunk over the time from it to the last: a server that sends several
tokens in its first chunk, as kvchat does when a draft follows the prompt, is
not credited for them; the first chunk's tokens are counted with the model's
tokenizer), end-to-end tokens/s (completion tokens over the time from the request
to the last chunk, the prompt's evaluation included), and whether the text equals
`kvchat-off`'s.
Prints the table and the medians and writes benchmarks/results/code_edits_peers.json.

    python benchmarks/code_edits_peers.py [--tasks 8] [--seed 1] [--servers ...] [--max-tokens 768]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from kvchat.llama import Model
from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from code_edit_tasks import CodeEditTask  # noqa: E402
from http_clients import client_for, running_server  # noqa: E402
from llama_server import llama_server_binary, version_line  # noqa: E402
from machine_info import machine  # noqa: E402
from peers import kvchat_command, llama_server_command  # noqa: E402
from stdlib_edit_tasks import draw  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "code_edits_peers.json"
SERVERS = ("kvchat-off", "kvchat", "kvchat-prediction", "llama-server", "llama-server-spec")


@dataclass
class EditRun:
    """One task on one server, as the client saw it."""

    task: str
    completion_tokens: int
    decode_s: float
    ttft_s: float
    text: str
    first_text: str
    first_chunk_tokens: int = 0
    """Tokens of the first content chunk (set by `run_server` with the model's tokenizer)."""

    @property
    def tok_s(self) -> float:
        """Decode rate: the tokens after the first content chunk over the time from it to the
        last (a server that sends several tokens at once in its first chunk, as kvchat does
        when a draft follows the prompt, is not credited for them)."""
        decoded = self.completion_tokens - self.first_chunk_tokens
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def end_to_end_tok_s(self) -> float:
        """Completion tokens over the time from the request to the last content chunk."""
        elapsed = self.ttft_s + self.decode_s
        return self.completion_tokens / elapsed if elapsed > 0 else 0.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="packaged model name (also the model id)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--seed", type=int, default=1, help="which standard-library tasks are drawn")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--max-tokens", type=int, default=768)
    p.add_argument("--ctx-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def command(name: str, args: argparse.Namespace):
    """The command line that starts server `name` on a port."""
    if name.startswith("kvchat"):
        return kvchat_command(args, *(["--speculation", "off"] if name == "kvchat-off" else []))
    return llama_server_command(args, *(["--spec-default"] if name == "llama-server-spec" else []))


async def edit(base_url: str, model: str, task: CodeEditTask, max_tokens: int, prediction: bool) -> EditRun:
    """One task, streamed, greedy; timed from the request's start."""
    extra = {"prediction": {"type": "content", "content": task.code}} if prediction else {}
    async with client_for(base_url) as client:
        start = time.perf_counter()
        first = last = None
        parts: list[str] = []
        first_text = ""
        tokens = None
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": task.user_message()}], stream=True,
            temperature=0, max_tokens=max_tokens, stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first, first_text = time.perf_counter(), chunk.choices[0].delta.content
                last = time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
    first = first or start
    return EditRun(task.name, tokens if tokens is not None else len(parts), (last or first) - first,
                   first - start, "".join(parts), first_text)


def run_server(name: str, tasks: list[CodeEditTask], args: argparse.Namespace,
               count_tokens: Callable[[str], int]) -> list[EditRun]:
    log = Path(tempfile.gettempdir()) / f"kvchat-code-edits-{name}.log"
    print(f"\n{name}: starting (log: {log})", flush=True)
    runs = []
    with running_server(command(name, args), "/health", log) as base_url:
        for task in tasks:
            run = asyncio.run(edit(base_url, args.model, task, args.max_tokens, name == "kvchat-prediction"))
            run.first_chunk_tokens = count_tokens(run.first_text)
            print(f"  {task.name:<60} {run.completion_tokens:>4} tokens ({run.first_chunk_tokens} in the first chunk) "
                  f"{run.tok_s:6.1f} tok/s, end to end {run.end_to_end_tok_s:6.1f}", flush=True)
            runs.append(run)
    return runs


def main() -> None:
    args = parse_args()
    tasks = draw(args.tasks, args.seed)
    print(f"seed {args.seed}: {len(tasks)} tasks from the standard library of Python {sys.version.split()[0]}")
    for task in tasks:
        print(f"  {task.name}: {task.instruction}")
    with Model(resolve(args.model)) as model:  # its tokenizer counts the tokens of first chunks
        def count_tokens(text: str) -> int:
            return len(model.tokenize(text, add_special=False)) if text else 0

        results = {name: run_server(name, tasks, args, count_tokens) for name in args.servers}
    reference = {r.task: r.text for r in results.get("kvchat-off", [])}
    medians = {name: statistics.median(r.tok_s for r in runs) for name, runs in results.items()}
    end_to_end = {name: statistics.median(r.end_to_end_tok_s for r in runs) for name, runs in results.items()}
    print(f"\n{'task':<60} " + " ".join(f"{n:>18}" for n in results))
    for i, task in enumerate(tasks):
        cells = []
        for runs in results.values():
            same = "" if not reference else ("=" if runs[i].text == reference[task.name] else "*")
            cells.append(f"{runs[i].tok_s:>17.1f}{same or ' '}")
        print(f"{task.name:<60} " + " ".join(cells))
    print(f"{'median tok/s':<60} " + " ".join(f"{medians[n]:>17.1f} " for n in results))
    print(f"{'median end-to-end tok/s':<60} " + " ".join(f"{end_to_end[n]:>17.1f} " for n in results))
    print("(= the text equals kvchat-off's greedy text, * it differs)")
    ratios = {f"{a}/{b}": medians[a] / medians[b] for a in results for b in results
              if a.startswith("kvchat") and b.startswith("llama-server") and medians[b]}
    end_to_end_ratios = {f"{a}/{b}": end_to_end[a] / end_to_end[b] for a in results for b in results
                         if a.startswith("kvchat") and b.startswith("llama-server") and end_to_end[b]}
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x (end to end {end_to_end_ratios[key]:.2f}x)")
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("model", "tasks", "seed", "servers", "max_tokens", "ctx_size",
                                                   "threads")},
        "llama_server": version_line(llama_server_binary()) if any(n.startswith("llama") for n in results) else None,
        "tasks": [{"name": t.name, "instruction": t.instruction} for t in tasks],
        "median_tok_s": medians,
        "ratios": ratios,
        "median_end_to_end_tok_s": end_to_end,
        "end_to_end_ratios": end_to_end_ratios,
        "identical_to_speculation_off": {name: [r.text == reference.get(r.task) for r in runs]
                                         for name, runs in results.items()} if reference else None,
        "runs": {name: [{**asdict(r), "tok_s": r.tok_s, "end_to_end_tok_s": r.end_to_end_tok_s} for r in runs]
                 for name, runs in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
