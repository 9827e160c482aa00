"""`kvchat serve` under K concurrent multi-turn chat clients.

Starts the server once (--parallel 16 by default) and, for each K, runs K users
at once, each doing its turns one after another and resending its whole history
on every call (benchmarks/http_clients.py). Prints one row per K: requests, wall
time, aggregate completion tokens/s, TTFT p50/p90/p99 and the mean share of
each prompt the server reported as cached.

    python benchmarks/server_load.py [--users 1 4 8 16] [--turns 4] [--max-tokens 64] [--quick]

Writes benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
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


def print_table(rows: dict[int, dict]) -> None:
    """One line per K."""
    print(f"\n{'K':>3} {'requests':>8} {'wall s':>8} {'tok/s':>7} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'cached':>7}")
    for k, s in rows.items():
        cached = "-" if s["cached_share"] is None else f"{s['cached_share']:.0%}"
        print(f"{k:>3} {s['requests']:>8} {s['wall_s']:>8.1f} {s['tokens_per_s']:>7.1f} {s['ttft_p50_s']:>9.3f} "
              f"{s['ttft_p90_s']:>7.3f} {s['ttft_p99_s']:>7.3f} {cached:>7}")


def main() -> None:
    args = parse_args()
    log = Path(tempfile.gettempdir()) / "kvchat-server-load.log"
    print(f"kvchat serve --parallel {args.parallel} --ctx-size {args.ctx_size} (log: {log})", flush=True)
    rows: dict[int, dict] = {}
    with running_server(serve_command(args), "/health", log) as base_url:
        for k in args.users:  # seed=k: no run finds an earlier one's conversations cached
            total = k * args.turns
            progress = print_progress(f"K={k}", total, every=max(k, total // 4))
            run = asyncio.run(concurrent(base_url, args.model, k, args.turns, args.max_tokens,
                                         seed=k, progress=progress))
            rows[k] = summarize(run)
    print_table(rows)
    settings = {key: getattr(args, key) for key in ("model", "users", "turns", "max_tokens", "parallel", "ctx_size")}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "settings": settings, "runs": {str(k): s for k, s in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
