"""`kvchat serve` under K concurrent multi-turn chat clients.

Starts the server once (--parallel 16 by default) and, for each K, runs K users
at once, each doing its turns one after another and resending its whole history
on every call (benchmarks/http_clients.py). Prints one row per K: requests, wall
time, aggregate completion tokens/s, TTFT p50/p90/p99, the mean share of each
prompt the server reported as cached, and the most requests the server ran at
once (sampled from /metrics).

With --unset-max-tokens each K also runs with max_tokens left out of every
request (the official client's default): the server bounds those answers by
its own --max-tokens (4096) and must still run them together, not one or two
at a time. The printout gives the unset run's tok/s over the set run's, for the
whole run and for the time every user was still in (one answer that repeats
itself until the server's bound can make the whole run's rate a measure of the
model, not of the server). --default-temperature leaves temperature out too,
the other default of the official client.

    python benchmarks/server_load.py [--users 1 4 8 16] [--turns 4] [--max-tokens 64] [--unset-max-tokens] [--quick]

Writes benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import httpx  # noqa: E402
from http_clients import concurrent, print_progress, running_server, summarize  # noqa: E402
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "server_load.json"
KVCHAT = Path(sys.executable).with_name("kvchat")


def parse_args() -> argparse.Namespace:
    """Command-line options; --quick shrinks the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent clients, one run each")
    p.add_argument("--turns", type=int, default=4, help="turns per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--unset-max-tokens", action="store_true",
                   help="also run every K with max_tokens left out of the requests")
    p.add_argument("--default-temperature", action="store_true",
                   help="leave temperature out of the requests (the server's default, 0.8) instead of 0")
    p.add_argument("--parallel", type=int, default=16, help="kvchat serve --parallel")
    p.add_argument("--ctx-size", type=int, default=8192, help="kvchat serve --ctx-size")
    p.add_argument("--threads", type=int, help="kvchat serve --threads (default: every core)")
    p.add_argument("--out", type=Path, help=f"results file (default: {RESULTS}; with --quick: in the temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 users, 2 turns, 16 tokens")
    args = p.parse_args()
    if args.quick:
        args.users, args.turns, args.max_tokens = [1, 2], 2, 16
    args.out = args.out or (Path(tempfile.gettempdir()) / RESULTS.name if args.quick else RESULTS)
    return args


def serve_command(args: argparse.Namespace) -> Callable[[int], list[str]]:
    """The `kvchat serve` command line for a port."""
    return lambda port: [str(KVCHAT), "serve", "--model", args.model, "--port", str(port),
                         "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
                         *(["--threads", str(args.threads)] if args.threads else [])]


def print_table(runs: dict[str, dict[int, dict]]) -> None:
    """One line per mode and K, then the unset/set tok/s ratios."""
    print(f"\n{'max_tokens':>10} {'K':>3} {'requests':>8} {'wall s':>8} {'tok/s':>7} {'all in':>7} {'TTFT p50':>9} "
          f"{'p90':>7} {'p99':>7} {'cached':>7} {'at once':>7}")
    for mode, rows in runs.items():
        for k, s in rows.items():
            cached = "-" if s["cached_share"] is None else f"{s['cached_share']:.0%}"
            print(f"{mode:>10} {k:>3} {s['requests']:>8} {s['wall_s']:>8.1f} {s['tokens_per_s']:>7.1f} "
                  f"{s['tokens_per_s_all_active']:>7.1f} {s['ttft_p50_s']:>9.3f} {s['ttft_p90_s']:>7.3f} {s['ttft_p99_s']:>7.3f} {cached:>7} "
                  f"{s['most_active']:>7}")
    if "unset" in runs:
        for k, unset in runs["unset"].items():
            whole = unset["tokens_per_s"] / runs["set"][k]["tokens_per_s"]
            all_in = unset["tokens_per_s_all_active"] / runs["set"][k]["tokens_per_s_all_active"]
            print(f"K={k}: tok/s with max_tokens unset / set = {whole:.2f} (whole run), {all_in:.2f} (all users in)")


async def most_active(base_url: str, done: asyncio.Event) -> int:
    """The highest `kvchat_requests_active` seen on /metrics, polled every 0.25 s until `done`."""
    highest = 0
    async with httpx.AsyncClient(base_url=base_url) as client:
        while not done.is_set():
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith("kvchat_requests_active "):
                    highest = max(highest, int(float(line.split()[1])))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)
    return highest


async def measured(base_url: str, args: argparse.Namespace, k: int, max_tokens: int | None, seed: int) -> dict:
    """K users at once; the summary, with the most requests the server ran at once."""
    total = k * args.turns
    progress = print_progress(f"K={k} max_tokens={max_tokens}", total, every=max(k, total // 4))
    done = asyncio.Event()
    sampler = asyncio.create_task(most_active(base_url, done))
    temperature = None if args.default_temperature else 0
    run = await concurrent(base_url, args.model, k, args.turns, max_tokens, seed=seed, progress=progress,
                           temperature=temperature)
    done.set()
    summary = summarize(run)
    summary["most_active"] = await sampler
    summary["tokens_per_s_all_active"] = all_active_rate(run.records)
    return summary


def all_active_rate(records: list) -> float | None:
    """Completion tokens per second while every user still had turns to go: from the
    first request sent until the first user received its last answer. Each answer's
    tokens count as spread evenly between its first token and its end. Unlike the
    whole run's rate, one user's very long answer at the end (the model repeating
    itself until the server's bound) does not weigh on it."""
    done = [r for r in records if r.error is None]
    if not done:
        return None
    start = min(r.started_at for r in records)
    last_turn_end: dict[int, float] = {}
    for r in records:
        last_turn_end[r.user] = max(last_turn_end.get(r.user, 0.0), r.started_at + r.total_s)
    window = min(last_turn_end.values()) - start
    tokens = 0.0
    for r in done:
        first, end = r.started_at + r.ttft_s - start, r.started_at + r.total_s - start
        if end <= first:
            tokens += r.completion_tokens if end <= window else 0
        else:
            tokens += r.completion_tokens * max(0.0, min(end, window) - first) / (end - first)
    return tokens / window if window > 0 else None


def main() -> None:
    args = parse_args()
    log = Path(tempfile.gettempdir()) / "kvchat-server-load.log"
    print(f"kvchat serve --parallel {args.parallel} --ctx-size {args.ctx_size} (log: {log})", flush=True)
    modes: dict[str, int | None] = {"set": args.max_tokens}
    if args.unset_max_tokens:
        modes["unset"] = None
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    with running_server(serve_command(args), "/health", log) as base_url:
        for k in args.users:
            for index, (mode, max_tokens) in enumerate(modes.items()):
                # A seed per run: no run finds an earlier one's conversations cached.
                runs[mode][k] = asyncio.run(measured(base_url, args, k, max_tokens, seed=k + 1000 * index))
    print_table(runs)
    settings = {key: getattr(args, key)
                for key in ("model", "users", "turns", "max_tokens", "parallel", "ctx_size", "default_temperature")}
    settings["server_max_tokens"] = 4096  # kvchat serve's default bound for requests without max_tokens
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "settings": settings,
              "runs": {str(k): s for k, s in runs["set"].items()},
              **({"runs_max_tokens_unset": {str(k): s for k, s in runs["unset"].items()}} if "unset" in runs else {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
