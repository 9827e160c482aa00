"""Coding-agent sessions, interleaved: kvchat against llama.cpp's own llama-server.

Codex CLI and Claude Code resend a long prefix (instructions and tools: 9-13k
tokens) and the whole session on every call, and several sessions run side by
side. Running the CLIs themselves on 2 cores is too slow and too model-dependent
to time (a 0.5B model seldom makes the tool call they wait for; docs/agents.md),
so this benchmark replays request sequences recorded from them instead, through
the official SDKs (`openai` for Codex's Responses API, `anthropic` for Claude
Code's Messages API):

- call 1 of a session is the CLI's captured first request (tests/data/, with a
  task of the session's own in place of the recorded one);
- each later call is the previous call's request plus a tool call and its result
  (a shell command and a few hundred tokens of output, different per session and
  call), as the CLIs send after running a tool. The model's own replies are not
  fed back, so every server gets the same request sequence.

`--sessions` sessions of each client run interleaved, one call at a time, in
rounds (session 1 of Codex, of Claude Code, session 2 of each, ...); with
`--start-together`, every session's first call is sent at once (sessions that
start side by side: each client's prompt should be evaluated once). Per call:
the prompt tokens the server reports evaluating (input tokens minus cached ones;
None where the server does not say), the prompt's growth since the session's
previous call (new tokens), time to first output event, and total time; for
kvchat also its cache counters after the call (evictions, spills, restores, KV
cells in use, each tier's tokens, from /metrics) and its engine's own time to
first token (from the request's submission to its first sampled token: kvchat
holds a reply that starts like a tool call until the call closes, so a client's
first event can come much later).

Servers (started fresh, same model file, threads and context): `kvchat`
(`kvchat serve --any-model`), `llama-server` (benchmarks/llama_server.py; it
serves both APIs).

The backend's floor (`--floor`, on by default): after the servers, the bare
`llama_decode` loop evaluates each later call's new tokens on top of a history
of that call's cached length, alone in a context of the same size (contiguous
cells, llama.cpp's default batch sizes), so each server's later calls can be
set against the least time the backend needs for their new tokens.

    python benchmarks/coding_agents.py [--sessions 3] [--calls 4] [--servers kvchat llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai

sys.path.insert(0, str(Path(__file__).parent))
from http_clients import running_server  # noqa: E402
from llama_server import llama_server_binary, version_line  # noqa: E402
from machine_info import machine  # noqa: E402
from peers import kvchat_command, llama_server_command  # noqa: E402

DATA = Path(__file__).parents[1] / "tests" / "data"
RESULTS = Path(__file__).parent / "results" / "coding_agents.json"
RECORDED_TASK_CODEX = "Run `cat notes.txt` with exec_command and tell me the first word."
RECORDED_TASK_CLAUDE = "Use the Bash tool to run `cat notes.txt`, then tell me the first word."
TASKS = (
    "Find where the configuration file is parsed and add a check for missing keys.",
    "List the Python files under src/ and tell me which one is the largest.",
    "Run the test suite and summarise the failures, if any.",
    "Rename the function load_data to read_dataset everywhere in the project.",
    "Explain what the Makefile's test target does.",
    "Add type hints to the functions in utils.py.",
)


@dataclass
class Call:
    """One call as the client saw it."""

    client: str
    session: int
    call: int
    prompt_tokens: int | None
    evaluated_tokens: int | None
    new_tokens: int | None
    ttft_s: float
    total_s: float
    cache: dict[str, float] | None = None  # kvchat only: its cache counters and tiers after the call
    error: str | None = None  # the server's error, if the call failed (its times: until then)


CACHE_METRICS = ("kvchat_cache_evictions_total", "kvchat_cache_spills_total", "kvchat_cache_restores_total",
                 "kvchat_cache_restore_failures_total", "kvchat_preemptions_total", "kvchat_kv_cells_used",
                 "kvchat_time_to_first_token_seconds_sum", "kvchat_time_to_first_token_seconds_count")
"""kvchat's counters read after each call; the engine's own time to first token (from the
request's submission to its first sampled token) comes from the last two, per call."""


def cache_metrics(base_url: str) -> dict[str, float] | None:
    """kvchat's cache counters, KV cells in use and tier sizes (None: no kvchat /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base_url}/metrics", timeout=30)
    if response.status_code != 200 or "kvchat_" not in response.text:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in CACHE_METRICS:
                found[sample.name.removeprefix("kvchat_")] = sample.value
            elif sample.name == "kvchat_cache_resident_tokens":
                found[f"resident_tokens_{sample.labels['tier']}"] = sample.value
    return found


def tool_output(session: int, call: int) -> str:
    """A shell command's output, a few hundred tokens, different per session and call."""
    lines = [f"src/module_{session}_{call}_{i}.py: def function_{i}(value_{i}): return value_{i} * {i + call}"
             for i in range(24)]
    return "\n".join(lines)


# ---------------------------------------------------------------- Codex: the Responses API


def codex_first(session: int) -> dict[str, Any]:
    body = json.loads((DATA / "codex_request.json").read_text())
    task = TASKS[session % len(TASKS)]
    for item in body["input"]:
        for part in item.get("content") or []:
            if isinstance(part, dict) and part.get("text") == RECORDED_TASK_CODEX:
                part["text"] = task
    return body


def codex_next(body: dict[str, Any], session: int, call: int) -> dict[str, Any]:
    body = copy.deepcopy(body)
    call_id = f"call_{session}_{call}"
    body["input"] += [
        {"type": "function_call", "name": "exec_command", "call_id": call_id,
         "arguments": json.dumps({"cmd": f"grep -rn function src/ | head -24  # step {call}"})},
        {"type": "function_call_output", "call_id": call_id, "output": tool_output(session, call)},
    ]
    return body


async def codex_call(client: openai.AsyncOpenAI, body: dict[str, Any], max_tokens: int) -> tuple[float, float, Any]:
    known = ("model", "input", "tools", "tool_choice", "parallel_tool_calls", "reasoning", "store", "include",
             "prompt_cache_key")
    start = time.perf_counter()
    first = None
    usage = None
    stream = await client.responses.create(
        **{k: body[k] for k in known if k in body}, stream=True, max_output_tokens=max_tokens, temperature=0,
        extra_body={k: v for k, v in body.items() if k not in known and k != "stream"},
    )
    async for event in stream:
        if first is None and event.type in ("response.output_item.added", "response.output_text.delta"):
            first = time.perf_counter()
        if event.type in ("response.completed", "response.incomplete"):
            usage = event.response.usage
    end = time.perf_counter()
    return (first or end) - start, end - start, usage


# ---------------------------------------------------------------- Claude Code: the Messages API


def claude_first(session: int) -> dict[str, Any]:
    body = json.loads((DATA / "claude_request.json").read_text())
    task = TASKS[(session + 3) % len(TASKS)]
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for block in message["content"]:
                if block.get("type") == "text" and RECORDED_TASK_CLAUDE in block.get("text", ""):
                    block["text"] = block["text"].replace(RECORDED_TASK_CLAUDE, task)
    return body


def claude_next(body: dict[str, Any], session: int, call: int) -> dict[str, Any]:
    body = copy.deepcopy(body)
    tool_id = f"toolu_{session}_{call}"
    body["messages"] += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Bash",
                                           "input": {"command": f"grep -rn function src/ | head -24  # step {call}"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                      "content": tool_output(session + 100, call)}]},
    ]
    return body


async def claude_call(client: anthropic.AsyncAnthropic, body: dict[str, Any], max_tokens: int
                      ) -> tuple[float, float, Any]:
    known = ("model", "messages", "system", "tools", "metadata", "thinking")
    start = time.perf_counter()
    first = None
    usage: dict[str, int] = {}
    stream = await client.messages.create(
        **{k: body[k] for k in known if k in body}, max_tokens=max_tokens, stream=True,
        extra_body={**{k: v for k, v in body.items() if k not in known and k not in ("stream", "max_tokens")},
                    "temperature": 0},
    )
    async for event in stream:
        if first is None and event.type == "content_block_start":
            first = time.perf_counter()
        if event.type == "message_start":
            usage.update(event.message.usage.model_dump(exclude_none=True))
        elif event.type == "message_delta":
            usage.update(event.usage.model_dump(exclude_none=True))
    end = time.perf_counter()
    return (first or end) - start, end - start, usage


# ---------------------------------------------------------------- sessions


async def run(base_url: str, args: argparse.Namespace) -> list[Call]:
    openai_client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=3600, max_retries=0)
    anthropic_client = anthropic.AsyncAnthropic(base_url=base_url, api_key="unused", timeout=3600, max_retries=0)
    bodies = {("codex", s): codex_first(s) for s in range(args.sessions)}
    bodies |= {("claude", s): claude_first(s) for s in range(args.sessions)}
    previous: dict[tuple[str, int], int] = {}

    async def one_call(name: str, session: int, call: int) -> Call:
        started = time.perf_counter()
        try:
            return await answered_call(name, session, call)
        except (openai.APIError, anthropic.APIError) as exc:
            failed = time.perf_counter() - started
            print(f"  {name:<6} session {session} call {call}: failed after {failed:.1f} s: {exc}", flush=True)
            return Call(name, session, call, None, None, None, failed, failed, cache_metrics(base_url), str(exc))

    async def answered_call(name: str, session: int, call: int) -> Call:
        key = (name, session)
        if name == "codex":
            if call:
                bodies[key] = codex_next(bodies[key], session, call)
            ttft, total, usage = await codex_call(openai_client, bodies[key], args.max_tokens)
            prompt = getattr(usage, "input_tokens", None)
            details = getattr(usage, "input_tokens_details", None)
            cached = getattr(details, "cached_tokens", None)
            evaluated = None if prompt is None or cached is None else prompt - cached
        else:
            if call:
                bodies[key] = claude_next(bodies[key], session, call)
            ttft, total, usage = await claude_call(anthropic_client, bodies[key], args.max_tokens)
            parts = [usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
            prompt = sum(p for p in parts if p) if parts[0] is not None else None
            evaluated = usage.get("input_tokens")
        new = None if prompt is None or key not in previous else prompt - previous[key]
        if prompt is not None:
            previous[key] = prompt
        cache = cache_metrics(base_url)
        print(f"  {name:<6} session {session} call {call}: prompt {prompt} evaluated {evaluated} "
              f"new {new} TTFT {ttft:.2f} s total {total:.2f} s", flush=True)
        if cache:
            print(f"         cache: {json.dumps(cache)}", flush=True)
        return Call(name, session, call, prompt, evaluated, new, ttft, total, cache)

    calls: list[Call] = []
    for call in range(args.calls):
        turns = [(name, session) for session in range(args.sessions) for name in args.clients]
        if call == 0 and args.start_together:
            calls += await asyncio.gather(*(one_call(name, session, 0) for name, session in turns))
        else:
            for name, session in turns:
                calls.append(await one_call(name, session, call))
    await openai_client.close()
    await anthropic_client.close()
    return calls


def command(name: str, args: argparse.Namespace):
    """The command line that starts server `name` on a port."""
    if name == "kvchat":
        return kvchat_command(args, "--any-model")
    return llama_server_command(args, "--jinja")


def engine_ttft(calls: list[Call]) -> dict[tuple[str, int, int], float]:
    """kvchat's own time to first token of each call made alone (one more request
    observed since the call before): the server's side of the client's TTFT, without
    the stream's shape (kvchat holds a reply that starts like a tool call until the
    call closes, so the client sees its first event only then)."""
    found: dict[tuple[str, int, int], float] = {}
    before = {"time_to_first_token_seconds_sum": 0.0, "time_to_first_token_seconds_count": 0.0}
    for c in calls:
        if not c.cache or "time_to_first_token_seconds_sum" not in c.cache:
            continue
        after = c.cache
        if after["time_to_first_token_seconds_count"] - before["time_to_first_token_seconds_count"] == 1:
            found[(c.client, c.session, c.call)] = (
                after["time_to_first_token_seconds_sum"] - before["time_to_first_token_seconds_sum"])
        before = after
    return found


def summary(calls: list[Call]) -> dict[str, Any]:
    failed = [c for c in calls if c.error is not None]
    engine = engine_ttft(calls)
    calls = [c for c in calls if c.error is None]
    later = [c for c in calls if c.call > 0]
    overhead = [c.evaluated_tokens / c.new_tokens for c in later
                if c.evaluated_tokens is not None and c.new_tokens]
    later_engine = [t for (_, _, call), t in engine.items() if call > 0]
    return {
        "first_call_ttft_s": [c.ttft_s for c in calls if c.call == 0],
        "later_ttft_median_s": statistics.median(c.ttft_s for c in later) if later else None,
        "later_engine_ttft_median_s": statistics.median(later_engine) if later_engine else None,
        "later_evaluated_over_new_max": max(overhead) if overhead else None,
        "total_s": sum(c.total_s for c in calls),
        "failed_calls": len(failed),
    }


def floor_seconds(model: str, ctx_size: int, threads: int, shapes: list[tuple[int, int]]) -> list[float]:
    """For each (cached, new) shape, in order of `cached`: the bare loop's time to evaluate
    `new` tokens after `cached` resident ones, in one context holding only that history."""
    from kvchat.llama import Batch, Context, ContextParams, Model
    from kvchat.models import resolve

    tokens = [(i * 7919) % 20000 + 100 for i in range(max(c + n for c, n in shapes))]
    with Model(resolve(model)) as loaded, Context(
        loaded, ContextParams(n_ctx=ctx_size, n_batch=2048, n_ubatch=512, n_seq_max=1, n_threads=threads)
    ) as ctx:
        batch = Batch(ctx.n_batch)

        def evaluate(start: int, end: int) -> None:
            for first in range(start, end, batch.capacity):
                batch.clear()
                last = min(end, first + batch.capacity)
                batch.add_chunk(tokens[first:last], first, 0, logits_last=last == end)
                ctx.decode(batch)

        floors, resident = [], 0
        for cached, new in shapes:  # by cached length: the history is evaluated once, growing
            evaluate(resident, cached)
            began = time.perf_counter()
            evaluate(cached, cached + new)
            floors.append(time.perf_counter() - began)
            ctx.seq_remove(0, cached, -1)
            resident = cached
    return floors


def against_floor(calls: list[Call], floors: dict[tuple[int, int], float]) -> dict[str, Any]:
    """Later calls' TTFT (and kvchat's own, where it says) over the backend's floor for their new tokens."""
    answered = [c for c in calls if c.call > 0 and c.error is None and c.prompt_tokens is not None and c.new_tokens]
    ratios = [c.ttft_s / floors[shape] for c in answered if (shape := floor_shape(c)) in floors]
    engine = engine_ttft(calls)
    engine_ratios = [engine[key] / floors[shape] for c in answered
                     if (key := (c.client, c.session, c.call)) in engine and (shape := floor_shape(c)) in floors]
    return {"later_ttft_over_floor_median": statistics.median(ratios) if ratios else None,
            "later_ttft_over_floor": ratios,
            "later_engine_ttft_over_floor_median": statistics.median(engine_ratios) if engine_ratios else None}


def floor_shape(call: Call) -> tuple[int, int]:
    """(cached history, new tokens) of a later call, as its own prompt counts say."""
    assert call.prompt_tokens is not None and call.new_tokens is not None
    return call.prompt_tokens - call.new_tokens, call.new_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--servers", nargs="+", choices=("kvchat", "llama-server"), default=["kvchat", "llama-server"])
    p.add_argument("--clients", nargs="+", choices=("codex", "claude"), default=["codex", "claude"])
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per call (the prompts are the load)")
    p.add_argument("--ctx-size", type=int, default=32768)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--start-together", action="store_true",
                   help="send every session's first call at once (sessions that start side by side)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the bare loop's time for each later call's new tokens")
    args = p.parse_args()
    results: dict[str, list[Call]] = {}
    for name in args.servers:
        log = Path(tempfile.gettempdir()) / f"kvchat-coding-agents-{name}.log"
        print(f"\n{name}: starting (log: {log})", flush=True)
        with running_server(command(name, args), "/health", log) as base_url:
            results[name] = asyncio.run(run(base_url, args))
    summaries = {name: summary(calls) for name, calls in results.items()}
    floors: dict[tuple[int, int], float] = {}
    if args.floor:
        shapes = sorted({floor_shape(c) for calls in results.values() for c in calls
                         if c.call > 0 and c.prompt_tokens is not None and c.new_tokens})
        if shapes:
            print(f"\nbackend floor: {len(shapes)} call shapes on the bare loop", flush=True)
            floors = dict(zip(shapes, floor_seconds(args.model, args.ctx_size, args.threads, shapes), strict=True))
            for name, calls in results.items():
                summaries[name] |= against_floor(calls, floors)
    for name, s in summaries.items():
        print(f"{name}: {json.dumps(s)}")
    if "kvchat" in summaries and "llama-server" in summaries:
        ours, theirs = summaries["kvchat"]["later_ttft_median_s"], summaries["llama-server"]["later_ttft_median_s"]
        if ours and theirs:
            print(f"later calls' median TTFT: llama-server / kvchat = {theirs / ours:.2f}x")
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("model", "servers", "clients", "sessions", "calls", "max_tokens",
                                                   "ctx_size", "threads", "start_together")},
        "llama_server": version_line(llama_server_binary()) if "llama-server" in results else None,
        "summaries": summaries,
        "floor_s": [{"cached": c, "new": n, "seconds": t} for (c, n), t in floors.items()],
        "calls": {name: [asdict(c) for c in calls] for name, calls in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
