"""A 16-turn Agent Framework session with a tool, prefix cache on against off, in one run.

Two paths, each with the cache on and off:
- in process: an `Agent` on `kvchat.integrations.agent_framework.KVChatClient`;
- over HTTP: an `Agent` on Agent Framework's own `OpenAIChatClient`, which speaks
  OpenAI's Responses API, pointed at kvchat's app (uvicorn on 127.0.0.1): each
  turn sends only its new input and `previous_response_id`; the server rebuilds
  the conversation from its response store.

The agent has one tool (`order_status`), which the user's message asks for on
turns 3, 7, 11 and 15 (two model calls on those turns: the call, then the
answer). Every turn is streamed; time to first token is measured by the client
(first text update). Every engine call is recorded: its prompt, its output and
its usage, so the benchmark reports for each call the tokens that are new (not
a prefix of any earlier call's prompt and output: what a perfect cache would
still have to evaluate) and the tokens the engine evaluated. Targets: time to
first token at turn 16 at least 10x lower with the cache; evaluated tokens per
call at most new + 2%. The backend's own ratio for turn 16 comes from the same
run: bare `llama_decode` of its whole prompt against only its new tokens after
the rest.

Writes benchmarks/results/agents.json.

    python benchmarks/agents.py [--turns 16] [--answer-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from agent_framework import tool
from agent_framework.openai import OpenAIChatClient
from pydantic import Field

from kvchat import Engine, EngineSettings
from kvchat.engine import Chunk
from kvchat.integrations.agent_framework import KVChatClient
from kvchat.llama import Batch, Context, Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve
from kvchat.server import create_app

sys.path.insert(0, str(Path(__file__).parent))
from bare_backend import evaluate, on_own_thread
from machine_info import machine

RESULTS = Path(__file__).parent / "results" / "agents.json"
INSTRUCTIONS = "You are a helpful assistant for an online shop. Answer in one or two sentences."
TOOL_TURNS = frozenset({3, 7, 11, 15})
ITEMS = ["running shoes", "a winter coat", "a laptop bag", "hiking boots", "a rain jacket", "a desk lamp",
         "a yoga mat", "headphones", "a backpack", "a coffee grinder", "a bike helmet", "a water bottle"]


def user_message(turn: int) -> str:
    if turn in TOOL_TURNS:
        return f"What is the status of order {1000 + turn}?"
    return f"Give me one tip for choosing {ITEMS[turn % len(ITEMS)]}."


def run_options(turn: int) -> dict[str, Any]:
    """Tool turns require the call (a 0.5B model does not call tools reliably on its own);
    the framework's follow-up call, after the tool's result, has tool_choice "none"."""
    return {"tool_choice": "required"} if turn in TOOL_TURNS else {}


@tool(name="order_status", description="The shipping status of an order, by its number.")
def order_status(order_id: Annotated[int, Field(description="the order number")]) -> str:
    return f"Order {order_id} shipped two days ago and arrives tomorrow."


@dataclass
class Call:
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    usage: Any = None


class CallRecorder:
    """Records every engine call's prompt, output tokens and usage."""

    def __init__(self, engine: Engine) -> None:
        self.calls: list[Call] = []
        self.model = engine.model
        submit = engine.submit

        def recording_submit(prompt_tokens: Sequence[int], *args: Any, **kwargs: Any):
            call = Call(list(prompt_tokens))
            stream = submit(prompt_tokens, *args, **kwargs)
            push = stream._push

            def record(item: Chunk | BaseException) -> None:
                if isinstance(item, Chunk):
                    call.output.extend(item.token_ids)
                    if item.usage is not None:
                        call.usage = item.usage
                push(item)

            stream._push = record  # type: ignore[method-assign]
            self.calls.append(call)
            return stream

        engine.submit = recording_submit  # type: ignore[method-assign]

    def text(self, call: Call) -> str:
        """A call's output as text, control tokens included."""
        return self.model.detokenize(call.output, special=True)


def new_tokens(call: Call, earlier: Sequence[Call]) -> int:
    """Tokens of `call`'s prompt that no earlier call left in the KV cache: those after
    its longest common prefix with any earlier call's prompt and output (but for an
    output's last token cut by max_tokens: sampled, never evaluated)."""
    shared = 0
    for previous in earlier:
        output = previous.output[:-1] if previous.usage.finish_reason == "length" else previous.output
        before = previous.prompt + output
        common = 0
        for a, b in zip(call.prompt, before, strict=False):
            if a != b:
                break
            common += 1
        shared = max(shared, common)
    return len(call.prompt) - shared


async def session(agent: Any, recorder: CallRecorder, turns: int) -> list[dict]:
    agent_session = agent.create_session()
    rows = []
    for turn in range(1, turns + 1):
        first_call = len(recorder.calls)
        started = time.perf_counter()
        ttft = None
        stream = agent.run(user_message(turn), session=agent_session, stream=True, options=run_options(turn))
        async for update in stream:
            if update.text and ttft is None:
                ttft = time.perf_counter() - started
        answer = (await stream.get_final_response()).text
        per_call = []
        for index in range(first_call, len(recorder.calls)):
            call = recorder.calls[index]
            per_call.append({
                "prompt_tokens": len(call.prompt),
                "new_tokens": new_tokens(call, recorder.calls[:index]),
                "evaluated_tokens": call.usage.evaluated_tokens,
                "cached_tokens": call.usage.cached_tokens,
                "completion_tokens": call.usage.completion_tokens,
                "tool_call": recorder.text(call).startswith("<tool_call>"),
            })
        rows.append({"turn": turn, "tool_turn": turn in TOOL_TURNS, "time_to_first_token": ttft,
                     "calls": per_call, "answer": answer})
        print(f"    turn {turn:>2}: ttft {ttft or float('nan'):.3f} s, calls "
              + ", ".join(f"{c['prompt_tokens']} prompt / {c['new_tokens']} new / {c['evaluated_tokens']} evaluated"
                          for c in per_call))
    return rows


def in_process(model: Model, cache: bool, turns: int, answer_tokens: int) -> tuple[list[dict], list[int]]:
    """The session's rows, and the last call's prompt."""
    with Engine(model, engine_settings(cache)) as engine:
        recorder = CallRecorder(engine)
        client = KVChatClient(engine, function_invocation_configuration={"max_iterations": 1})
        agent = client.as_agent(instructions=INSTRUCTIONS, tools=[order_status],
                                default_options={"temperature": 0.0, "max_tokens": answer_tokens})
        return asyncio.run(session(agent, recorder, turns)), recorder.calls[-1].prompt


def over_http(model: Model, model_name: str, cache: bool, turns: int,
              answer_tokens: int) -> tuple[list[dict], list[int]]:
    """The session's rows, and the last call's prompt."""
    with Engine(model, engine_settings(cache)) as engine:
        recorder = CallRecorder(engine)
        with LocalServer(create_app(engine, model_name=model_name)) as url:
            client = OpenAIChatClient(model=model_name, base_url=url + "/v1", api_key="unused",
                                      function_invocation_configuration={"max_iterations": 1})
            agent = client.as_agent(instructions=INSTRUCTIONS, tools=[order_status],
                                    default_options={"temperature": 0.0, "max_tokens": answer_tokens})
            return asyncio.run(session(agent, recorder, turns)), recorder.calls[-1].prompt


def backend_prompt_seconds(model: Model, prompt: list[int], new: int, reps: int = 3) -> dict[str, float]:
    """The backend's own time for the last turn's prompt, by bare `llama_decode` with
    the engine's context: `whole` evaluates the whole prompt (the cache off), `new`
    only its last `new` tokens after the rest (the cache on). Medians of `reps`."""
    settings = engine_settings(True)
    times: dict[str, list[float]] = {"whole": [], "new": []}

    def timed(ctx: Context, batch: Batch, start: int) -> float:
        began = time.perf_counter()
        evaluate(ctx, batch, prompt, start)
        return time.perf_counter() - began

    def measure() -> None:
        with Context(model, settings.context_params(model)) as ctx, Batch(settings.n_batch) as batch:
            for rep in range(reps + 1):
                ctx.seq_remove(0)
                whole = timed(ctx, batch, 0)
                ctx.seq_remove(0, len(prompt) - new)
                part = timed(ctx, batch, len(prompt) - new)
                if rep:  # the first round warms up
                    times["whole"].append(whole)
                    times["new"].append(part)

    on_own_thread(measure)
    return {name: statistics.median(values) for name, values in times.items()}


def engine_settings(cache: bool) -> EngineSettings:
    return EngineSettings(n_ctx=16384, max_running=8, n_seq_max=32, prefix_cache=cache)


class LocalServer:
    """uvicorn on 127.0.0.1 in a thread, for the length of a `with` block; yields the base URL."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def summary(on: list[dict], off: list[dict]) -> dict:
    last_on, last_off = on[-1]["time_to_first_token"], off[-1]["time_to_first_token"]
    calls = [c for row in on[1:] for c in row["calls"]]
    worst = max(c["evaluated_tokens"] / max(c["new_tokens"], 1) for c in calls)
    return {
        "ttft_last_turn_on": last_on,
        "ttft_last_turn_off": last_off,
        "ttft_ratio": last_off / last_on,
        "ttft_target": 10.0,
        "evaluated_total_on": sum(c["evaluated_tokens"] for c in calls),
        "new_total_on": sum(c["new_tokens"] for c in calls),
        "evaluated_over_new_worst_call": worst,
        "evaluated_target": 1.02,
        "calls_within_target": sum(c["evaluated_tokens"] <= 1.02 * c["new_tokens"] for c in calls),
        "calls": len(calls),
        "tool_calls_made": sum(c["tool_call"] for c in calls),
        "calls_over_target": [
            {"turn": row["turn"], "call": i, **c}
            for row in on[1:] for i, c in enumerate(row["calls"])
            if c["evaluated_tokens"] > 1.02 * c["new_tokens"]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    os.environ.setdefault("NO_PROXY", "127.0.0.1")
    model = Model(resolve(args.model))
    runs: dict[str, dict[str, list[dict]]] = {"in_process": {}, "http": {}}
    last_prompts: dict[tuple[str, str], list[int]] = {}
    for cache in (True, False):
        label = "on" if cache else "off"
        print(f"in process, cache {label}")
        runs["in_process"][label], last_prompts[("in_process", label)] = in_process(
            model, cache, args.turns, args.answer_tokens)
        print(f"over HTTP (Responses API, previous_response_id), cache {label}")
        runs["http"][label], last_prompts[("http", label)] = over_http(
            model, args.model, cache, args.turns, args.answer_tokens)
    backend = {}
    for path in runs:
        last_call = runs[path]["on"][-1]["calls"][-1]
        seconds = backend_prompt_seconds(model, last_prompts[(path, "on")], last_call["new_tokens"])
        backend[path] = {"prompt_tokens": last_call["prompt_tokens"], "new_tokens": last_call["new_tokens"],
                         "seconds_whole": seconds["whole"], "seconds_new": seconds["new"],
                         "ratio": seconds["whole"] / seconds["new"]}
    model.close()
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "turns": args.turns,
        "answer_tokens": args.answer_tokens,
        "tool_turns": sorted(TOOL_TURNS),
    }
    print(f"\n{'path':>10} {'TTFT turn 16 off':>17} {'on':>8} {'off/on':>7} {'evaluated/new':>14} "
          f"{'worst call':>11} {'calls <= new+2%':>16}")
    for path, modes in runs.items():
        figures = summary(modes["on"], modes["off"])
        figures["backend_last_turn"] = backend[path]
        results[path] = {"summary": figures, "on": modes["on"], "off": modes["off"]}
        print(f"{path:>10} {figures['ttft_last_turn_off']:>16.3f}s {figures['ttft_last_turn_on']:>7.3f}s "
              f"{figures['ttft_ratio']:>6.1f}x {figures['evaluated_total_on'] / figures['new_total_on']:>14.3f} "
              f"{figures['evaluated_over_new_worst_call']:>11.3f} "
              f"{figures['calls_within_target']:>8}/{figures['calls']}   tool calls {figures['tool_calls_made']}")
        own = backend[path]
        print(f"{'':>12}the backend's own: the last prompt ({own['prompt_tokens']} tokens) "
              f"{own['seconds_whole']:.3f} s whole, {own['seconds_new']:.3f} s for its {own['new_tokens']} new "
              f"tokens after the rest: {own['ratio']:.1f}x")
        for call in figures["calls_over_target"]:
            print(f"{'':>12}over new + 2%: turn {call['turn']} call {call['call']}: "
                  f"{call['evaluated_tokens']} evaluated, {call['new_tokens']} new")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
