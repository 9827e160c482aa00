"""Speculative decoding on and off, in one run: code edits, predicted outputs, prose, several users.

Qwen2.5-Coder 0.5B by default. Scenarios, each run with speculation on and off
(alternating, so that the machine's drift hits both alike):

- `code_edit`: a user pastes a Python function of 30 to 80 lines and asks for
  a small change (benchmarks/code_edit_tasks.py); the model rewrites it
  (temperature 0, up to 256 tokens). One conversation at a time.
- `code_edit_prediction`: the same with the original code as the prediction
  (OpenAI's predicted outputs).
- `prose`: one chat of several turns with the user messages of
  benchmarks/multiturn.py, the whole history on every call.
- `users_4`, `users_8`: that many code edits at once; aggregate tok/s, their
  prompts evaluated before the timed calls (see `WARM_PROMPTS`).

Every round (the calls made together) starts from a fresh cache: a new engine
in process, an API key of its own over HTTP. So no round drafts from the
replies of an earlier round that asked the same (the scenarios reuse the tasks).

Each scenario runs in process (a new `Engine` per round, one at a time) and
over HTTP (`kvchat serve --speculation auto|off` with the official `openai`
client, streaming). The
figure is decode tok/s: completion tokens after the first over the time from
the first token to the last (speculation changes the answer's decode, not the
prompt's evaluation); end-to-end tok/s (completion tokens over the time from
the call to the last token) is reported too. At temperature 0 every output
must be identical with and without speculation; where one differs, the first
differing position is reported with the logit margin (top 1 minus top 2) of the
non-speculative run there, measured by a bare `llama_decode`.

The backend's own figures come from the same run: bare `llama_decode` calls of
1 to 63 rows of one sequence after a code-edit prompt, timed before and after
the scenarios. They give the best speed-up any draft could bring (drafts always
accepted, as long as the engine allows) and, per single-conversation scenario,
the speed-up of that run's own decode steps and rows on the bare backend.

Writes benchmarks/results/speculative.json and docs/images/speculative.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bare_backend import evaluate, on_own_thread, row_call_seconds  # noqa: E402
from code_edit_tasks import TASKS, CodeEditTask  # noqa: E402
from http_clients import client_for, running_server  # noqa: E402
from machine_info import machine  # noqa: E402
from multiturn import user_message  # noqa: E402

from kvchat import Engine, EngineSettings  # noqa: E402
from kvchat.chat import ChatTokenizer  # noqa: E402
from kvchat.engine import SamplingParams  # noqa: E402
from kvchat.llama import Batch, Context, ContextParams, Model  # noqa: E402
from kvchat.models import resolve  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "speculative.json"
CHART = Path(__file__).parent.parent / "docs" / "images" / "speculative.png"
KVCHAT = Path(sys.executable).with_name("kvchat")
SYSTEM = "You are a careful Python assistant. When asked to change code, reply with the whole updated function."
TARGETS = {"code_edit": 1.8, "code_edit_prediction": 2.5, "prose": 0.97, "users_4": 1.3, "users_8": 1.3}
MODES = ("on", "off")


@dataclass
class Call:
    """One request as the caller saw it."""

    scenario: str
    mode: str
    label: str
    completion_tokens: int
    seconds: float
    """From the call to its last token."""
    decode_seconds: float
    """From its first token to its last."""
    draft_tokens: int | None = None
    accepted_draft_tokens: int | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_ids: list[int] = field(default_factory=list)


def edit_messages(task: CodeEditTask) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.user_message()}]


# ---------------------------------------------------------------- in process


class InProcess:
    """An engine on the model per round, speculation on or off.

    Only one engine exists at a time: while a second thread that has run
    `llama_decode` lives in the process, every decode is slower (each such
    thread keeps an OpenMP team; see benchmarks/embedding_interference.py),
    which would slow most the mode that makes the most calls.
    """

    def __init__(self, model: Model, max_tokens: int) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.tokenizer = ChatTokenizer(model)

    def engine(self, mode: str) -> Engine:
        return Engine(self.model, EngineSettings(n_ctx=16384, max_running=8, n_seq_max=16,
                                                 speculation="auto" if mode == "on" else "off"))

    def sampling(self, prediction: str | None) -> SamplingParams:
        predicted = tuple(self.model.tokenize(prediction)) if prediction else ()
        return SamplingParams(temperature=0, max_tokens=self.max_tokens, prediction=predicted)

    def calls(self, scenario: str, mode: str, jobs: list[tuple[str, list[dict], str | None]]) -> list[Call]:
        """Submit every job at once to a new engine; time each one's stream."""
        with self.engine(mode) as engine:
            if WARM_PROMPTS and len(jobs) > 1:  # evaluate the prompts first
                warm = [engine.submit(self.tokenizer.encode(messages), SamplingParams(temperature=0, max_tokens=1))
                        for _, messages, _ in jobs]
                for stream in warm:
                    stream.collect()
            started = time.perf_counter()
            streams = []
            for label, messages, prediction in jobs:
                prompt = self.tokenizer.encode(messages)
                streams.append((label, prompt, engine.submit(prompt, self.sampling(prediction))))
            # Each stream's chunks are timestamped as they are read, which for all but
            # the first would be later than they arrived if read in turn: read them on threads.
            results = _drain_concurrently([s for _, _, s in streams], started)
        calls = []
        for (label, prompt, stream), (first, last, ids, text) in zip(streams, results, strict=True):
            u = stream.usage
            calls.append(Call(scenario, mode, label, u.completion_tokens, last - started, last - first,
                              u.draft_tokens, u.accepted_draft_tokens, ids, text, list(prompt)))
        return calls


def _drain_concurrently(streams, started: float) -> list[tuple[float, float, list[int], str]]:
    import threading

    out: list = [None] * len(streams)

    def drain(i: int) -> None:
        first = last = None
        ids: list[int] = []
        parts: list[str] = []
        for chunk in streams[i]:
            now = time.perf_counter()
            if chunk.token_ids:
                first = first or now
                last = now
            ids.extend(chunk.token_ids)
            parts.append(chunk.text)
        out[i] = (first or started, last or started, ids, "".join(parts))

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# ---------------------------------------------------------------- over HTTP


WARM_PROMPTS = True
"""Rounds of several users have their prompts evaluated (a 1-token call each, in the
round's own engine or namespace) before the timed calls, which then find them
cached. The figure is decode tok/s; without this, the window from the first
user's first token to the last user's last token would also hold the other
users' prompt evaluation (about 2,800 tokens for 8 users, some 10 s on 2 cores,
the same with and without drafts), which speculation does not touch."""

ROUND_KEYS = tuple(f"round-{i}" for i in range(64))
"""The servers' API keys: one per round, each its own cache namespace."""


class OverHttp:
    """Two `kvchat serve` processes, speculation on and off, and the official client.

    Each round uses an API key of its own, so it starts from a fresh cache
    namespace (no cached prefix, an empty n-gram cache), as each round in process
    starts from a new engine: a round never drafts from the replies of an earlier
    round that asked the same.
    """

    def __init__(self, base_urls: dict[str, str], model: str, max_tokens: int) -> None:
        self.clients = {m: client_for(url) for m, url in base_urls.items()}
        self.rounds = dict.fromkeys(base_urls, 0)
        self.model = model
        self.max_tokens = max_tokens

    async def one(self, client, scenario: str, mode: str, label: str, messages: list[dict],
                  prediction: str | None) -> Call:
        extra = {"prediction": {"type": "content", "content": prediction}} if prediction else {}
        started = time.perf_counter()
        first = last = None
        parts: list[str] = []
        usage = None
        stream = await client.chat.completions.create(
            model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens, stream=True,
            stream_options={"include_usage": True}, **extra)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                first = first or now
                last = now
                parts.append(chunk.choices[0].delta.content)
        details = getattr(usage, "completion_tokens_details", None) if usage else None
        accepted = getattr(details, "accepted_prediction_tokens", None) if details else None
        rejected = getattr(details, "rejected_prediction_tokens", None) if details else None
        return Call(scenario, mode, label, usage.completion_tokens if usage else 0, (last or started) - started,
                    (last or started) - (first or started),
                    None if accepted is None else accepted + (rejected or 0), accepted, [], "".join(parts))

    async def calls(self, scenario: str, mode: str, jobs: list[tuple[str, list[dict], str | None]]) -> list[Call]:
        client = self.clients[mode].with_options(api_key=ROUND_KEYS[self.rounds[mode]])
        self.rounds[mode] += 1
        if WARM_PROMPTS and len(jobs) > 1:  # evaluate the prompts first
            await asyncio.gather(*(client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                                  max_tokens=1) for _, messages, _ in jobs))
        return list(await asyncio.gather(*(self.one(client, scenario, mode, *job) for job in jobs)))


# ---------------------------------------------------------------- scenarios


def scenario_jobs(args: argparse.Namespace) -> dict[str, list[list[tuple[str, list[dict], str | None]]]]:
    """Per scenario, the rounds of jobs submitted together (each round run on and off)."""
    tasks = TASKS[: args.tasks]
    return {
        "code_edit": [[(t.name, edit_messages(t), None)] for t in tasks],
        "code_edit_prediction": [[(t.name, edit_messages(t), t.code)] for t in tasks],
        "users_4": [[(t.name, edit_messages(t), None) for t in tasks[:4]]],
        "users_8": [[(t.name, edit_messages(t), None) for t in (TASKS * 2)[:8]]],
    }


def prose_turn(history: list[dict], turn: int) -> list[dict]:
    return [*history, {"role": "user", "content": user_message(0, turn)}]


async def run_all(runner, args: argparse.Namespace, is_async: bool) -> list[Call]:
    """Every scenario, each round on and off in alternating order."""
    calls: list[Call] = []

    async def round_(scenario: str, jobs, order) -> dict[str, list[Call]]:
        out = {}
        for mode in order:
            result = runner.calls(scenario, mode, jobs)
            out[mode] = await result if is_async else result
            calls.extend(out[mode])
        return out

    for scenario, rounds in scenario_jobs(args).items():
        for i, jobs in enumerate(rounds):
            order = MODES if i % 2 == 0 else MODES[::-1]
            done = await round_(scenario, jobs, order)
            print(f"  {scenario} {jobs[0][0] if len(jobs) == 1 else len(jobs)}: "
                  + ", ".join(f"{m} {_rate(done[m]):.1f} tok/s" for m in MODES), flush=True)
    histories = {m: [{"role": "system", "content": "A helpful assistant talks with user 0."}] for m in MODES}
    for turn in range(1, args.prose_turns + 1):
        order = MODES if turn % 2 else MODES[::-1]
        for mode in order:
            messages = prose_turn(histories[mode], turn)
            result = runner.calls("prose", mode, [(f"turn {turn}", messages, None)])
            (call,) = await result if is_async else result
            calls.append(call)
            histories[mode] = [*messages, {"role": "assistant", "content": call.text}]
        print(f"  prose turn {turn}", flush=True)
    return calls


def _rate(calls: list[Call]) -> float:
    """Decode tok/s of calls made together: tokens after each one's first, over the
    time from the earliest first token to the latest last one."""
    window = max(c.seconds for c in calls) - min(c.seconds - c.decode_seconds for c in calls)
    tokens = sum(max(c.completion_tokens - 1, 0) for c in calls)
    return tokens / window if window > 0 else 0.0


def summarize(calls: list[Call]) -> dict[str, dict]:
    """Per scenario: decode and end-to-end tok/s on and off, their ratios, acceptance."""
    out: dict[str, dict] = {}
    for scenario in dict.fromkeys(c.scenario for c in calls):
        row: dict = {}
        for mode in MODES:
            mine = [c for c in calls if c.scenario == scenario and c.mode == mode]
            if scenario.startswith("users_"):
                decode_rate = _rate(mine)
                e2e = sum(c.completion_tokens for c in mine) / max(c.seconds for c in mine)
            else:
                decode_rate = sum(c.completion_tokens - 1 for c in mine) / sum(c.decode_seconds for c in mine)
                e2e = sum(c.completion_tokens for c in mine) / sum(c.seconds for c in mine)
            drafted = sum(c.draft_tokens or 0 for c in mine)
            accepted = sum(c.accepted_draft_tokens or 0 for c in mine)
            row[mode] = {"decode_tok_s": decode_rate, "end_to_end_tok_s": e2e, "completion_tokens":
                         sum(c.completion_tokens for c in mine), "draft_tokens": drafted,
                         "accepted_draft_tokens": accepted, "calls": len(mine)}
        row["decode_ratio"] = row["on"]["decode_tok_s"] / row["off"]["decode_tok_s"]
        row["end_to_end_ratio"] = row["on"]["end_to_end_tok_s"] / row["off"]["end_to_end_tok_s"]
        row["target"] = TARGETS[scenario]
        row["met"] = row["decode_ratio"] >= TARGETS[scenario]
        out[scenario] = row
    return out


def identity(calls: list[Call], model: Model | None) -> dict:
    """Compare every on-output with its off-twin; report divergences with the logit margin."""
    pairs: dict[tuple[str, str], dict[str, Call]] = {}
    for c in calls:
        pairs.setdefault((c.scenario, c.label), {})[c.mode] = c
    diverged = []
    for (scenario, label), pair in pairs.items():
        on, off = pair["on"], pair["off"]
        same = on.token_ids == off.token_ids if on.token_ids else on.text == off.text
        if same:
            continue
        entry: dict = {"scenario": scenario, "label": label}
        if on.token_ids and model is not None:
            k = next(i for i, (a, b) in enumerate(zip(on.token_ids + [-1], off.token_ids + [-2])) if a != b)
            entry.update(position=k, on_token=on.token_ids[k] if k < len(on.token_ids) else None,
                         off_token=off.token_ids[k] if k < len(off.token_ids) else None,
                         off_margin=logit_margin(model, off.prompt_ids + off.token_ids[:k]))
        else:
            k = next(i for i, (a, b) in enumerate(zip(on.text + "\0", off.text + "\1")) if a != b)
            entry.update(char=k, on=on.text[max(0, k - 20):k + 20], off=off.text[max(0, k - 20):k + 20])
        diverged.append(entry)
    return {"compared": len(pairs), "identical": len(pairs) - len(diverged), "diverged": diverged}


def logit_margin(model: Model, tokens: list[int]) -> float:
    """Top-1 minus top-2 logit after `tokens`, by a bare `llama_decode` (one sequence)."""
    with Context(model, ContextParams(n_ctx=max(1024, len(tokens) + 16), n_batch=512, n_ubatch=512,
                                      n_seq_max=1)) as ctx, Batch(512) as batch:
        evaluate(ctx, batch, tokens)
        logits = np.sort(ctx.logits(batch.n_tokens - 1))
    return float(logits[-1] - logits[-2])


# ---------------------------------------------------------------- the backend's own ceiling

CEILING_ROWS = (1, 2, 3, 5, 9, 13, 17, 25, 33, 49, 63, 64)
"""Rows of the bare verify calls timed: up to 63 row by row, and 64 (the engine's default
longest draft, 63 tokens, plus the last token: one tile of the tiled kernel)."""


def verify_call_costs(model: Model, context_tokens: list[int], reps: int = 7) -> dict[int, float]:
    """Seconds of a bare `llama_decode` of n rows of one sequence after `context_tokens`
    (median of `reps`, the row counts interleaved so that drift hits all alike), with
    the engine's context parameters; the rows are removed after each call."""
    settings = EngineSettings(n_ctx=16384, n_seq_max=16)
    with Context(model, settings.context_params(model)) as ctx, Batch(settings.n_batch) as batch:
        evaluate(ctx, batch, context_tokens)
        return row_call_seconds(ctx, batch, context_tokens[-CEILING_ROWS[-1]:], len(context_tokens),
                                CEILING_ROWS, reps)


def backend_ceiling(costs: dict[int, float], results: dict) -> dict:
    """What the backend itself allows, from the bare call costs measured in this run:
    the speed-up of drafts that are always accepted (a call of n rows yields n tokens)
    at the best call shape up to the engine's default longest draft
    (`perfect_drafts`) and up to the longest call timed (`perfect_drafts_longest`).
    Drafting cannot beat them, apart from the engine's own work per step (which
    fewer steps also save); next to them, each scenario's measured ratios."""
    default_rows = EngineSettings().max_draft_tokens + 1

    def best(limit: int) -> tuple[float, int]:
        return max((rows * costs[1] / seconds, rows) for rows, seconds in costs.items() if rows <= limit)

    perfect, perfect_rows = best(default_rows)
    longest, longest_rows = best(max(costs))
    return {"call_cost": {str(rows): seconds / costs[1] for rows, seconds in costs.items()},
            "one_row_ms": costs[1] * 1000,
            "perfect_drafts": perfect, "perfect_drafts_rows": perfect_rows,
            "perfect_drafts_longest": longest, "perfect_drafts_longest_rows": longest_rows,
            "measured": {where: {scenario: row["decode_ratio"] for scenario, row in results[where].items()}
                         for where in ("in_process", "http") if where in results}}


# ---------------------------------------------------------------- report


def print_summary(label: str, summary: dict[str, dict]) -> None:
    print(f"\n{label}")
    print(f"{'scenario':>22} {'off tok/s':>9} {'on tok/s':>9} {'on/off':>7} {'e2e on/off':>10} {'accepted':>9} "
          f"{'target':>7}")
    for scenario, row in summary.items():
        on = row["on"]
        rate = on["accepted_draft_tokens"] / on["draft_tokens"] if on["draft_tokens"] else 0.0
        print(f"{scenario:>22} {row['off']['decode_tok_s']:>9.1f} {on['decode_tok_s']:>9.1f} "
              f"{row['decode_ratio']:>6.2f}x {row['end_to_end_ratio']:>9.2f}x {rate:>8.0%} "
              f"{row['target']:>6.2f}x {'met' if row['met'] else 'NOT MET'}")


def print_ceiling(ceiling: dict) -> None:
    costs = ", ".join(f"{rows}: {cost:.2f}" for rows, cost in ceiling["call_cost"].items())
    print(f"\nbackend: a 1-row call {ceiling['one_row_ms']:.1f} ms; a call of n rows costs (n: 1-row calls) {costs}")
    print(f"  drafts always accepted: at most {ceiling['perfect_drafts']:.2f}x "
          f"({ceiling['perfect_drafts_rows']} rows, the default longest draft), "
          f"{ceiling['perfect_drafts_longest']:.2f}x ({ceiling['perfect_drafts_longest_rows']} rows, the longest timed)")
    for where, ratios in ceiling["measured"].items():
        print(f"  measured {where.replace('_', ' ')}: " + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()))


def chart(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(TARGETS)
    fig, ax = plt.subplots(figsize=(8, 4.6))
    width = 0.38
    for i, (where, color) in enumerate((("in_process", "#4477aa"), ("http", "#66ccee"))):
        summary = results.get(where)
        if not summary:
            continue
        values = [summary[s]["decode_ratio"] if s in summary else 0 for s in scenarios]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(scenarios))], values, width, label=where.replace("_", " "),
                      color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for x, s in enumerate(scenarios):
        ax.hlines(TARGETS[s], x - 0.45, x + 0.45, colors="#cc3311", linestyles="dashed")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    if "backend" in results:
        ax.axhline(results["backend"]["perfect_drafts"], color="#555555", linestyle="dotted", linewidth=1,
                   label="bare llama_decode, one conversation, drafts always accepted")
    ax.set_xticks(range(len(scenarios)), [s.replace("_", " ") for s in scenarios], fontsize=9)
    ax.set_ylabel("decode tok/s, speculation on / off")
    ax.set_title("Speculative decoding, Qwen2.5-Coder 0.5B, 2 CPU cores (dashed: target)")
    ax.set_ylim(0, max(3.4, ax.get_ylim()[1]))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHART, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=len(TASKS), help="code-edit conversations (at least 8)")
    parser.add_argument("--prose-turns", type=int, default=6)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model = Model(resolve(args.model))
    results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                     "model": args.model, "max_tokens": args.max_tokens, "tasks": args.tasks}
    # The backend's own call costs, timed before and after the scenarios (drift hits both).
    task = TASKS[0]
    context = ChatTokenizer(model).encode(edit_messages(task)) + model.tokenize(task.code)[: args.max_tokens // 2]
    costs_before = on_own_thread(verify_call_costs, model, context)
    print("in process")
    calls = asyncio.run(run_all(InProcess(model, args.max_tokens), args, is_async=False))
    results["in_process"] = summarize(calls)
    results["in_process_identity"] = on_own_thread(identity, calls, model)
    results["in_process_calls"] = [{k: v for k, v in asdict(c).items() if k not in ("token_ids", "prompt_ids",
                                                                                      "text")} for c in calls]
    print_summary("in process", results["in_process"])
    if not args.skip_http:
        print("\nover HTTP")
        logs = Path("/tmp/kvchat-speculative")
        serve = lambda mode: lambda port: [str(KVCHAT), "serve", "--model", args.model, "--port", str(port),  # noqa: E731
                                            "--ctx-size", "16384", "--parallel", "8", "--speculation", mode, "--key-share", "1",
                                            *(arg for key in ROUND_KEYS for arg in ("--api-key", key))]
        with running_server(serve("auto"), "/health", logs / "on.log") as on_url, \
                running_server(serve("off"), "/health", logs / "off.log") as off_url:
            http = OverHttp({"on": on_url, "off": off_url}, args.model, args.max_tokens)
            http_calls = asyncio.run(run_all(http, args, is_async=True))
        results["http"] = summarize(http_calls)
        results["http_identity"] = identity(http_calls, None)
        results["http_calls"] = [{k: v for k, v in asdict(c).items() if k not in ("token_ids", "prompt_ids",
                                                                                   "text")} for c in http_calls]
        print_summary("over HTTP", results["http"])
    costs_after = on_own_thread(verify_call_costs, model, context)
    costs = {rows: (costs_before[rows] + costs_after[rows]) / 2 for rows in costs_before}
    results["backend"] = {"context_tokens": len(context), "seconds_before": costs_before,
                          "seconds_after": costs_after, **backend_ceiling(costs, results)}
    print_ceiling(results["backend"])
    for key in ("in_process_identity", "http_identity"):
        if key in results:
            ident = results[key]
            print(f"{key}: {ident['identical']}/{ident['compared']} identical; diverged: {ident['diverged']}")
    model.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    chart(results)
    print(f"wrote {args.out} and {CHART}")


if __name__ == "__main__":
    main()
