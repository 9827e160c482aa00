"""Soak `kvchat serve` for a while, then fuzz its HTTP API beyond the CI budget.

The same load as tests/soak/test_soak.py (32 streaming clients, full history,
random disconnects, edits, max_tokens and stop strings), by duration, with the
server's resident memory sampled every round; then schemathesis with more
examples per operation (tests/test_server_fuzz.py, KVCHAT_FUZZ_EXAMPLES).

    python benchmarks/soak.py [--minutes 10] [--clients 32] [--fuzz-examples 300]

Writes benchmarks/results/soak.json; the figures go to docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine_info import machine  # noqa: E402

from tests.http_server import ServeProcess  # noqa: E402
from tests.soak.driver import SoakConfig, resident_bytes, run_soak, scrape_metrics, wait_until_idle  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
MIB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--round-seconds", type=float, default=60.0, help="memory is sampled after each round")
    p.add_argument("--fuzz-examples", type=int, default=300, help="schemathesis examples per operation (0: skip)")
    args = p.parse_args()

    log = Path(tempfile.gettempdir()) / "kvchat-soak.log"
    log.unlink(missing_ok=True)
    server = ServeProcess("--model", args.model, "--parallel", "16", "--ctx-size", "8192", "--max-tokens", "64",
                          "--no-access-log", log_path=str(log))
    rounds, totals = [], {"requests": 0, "completed": 0, "disconnected": 0, "other": 0, "edits": 0}
    with server:
        asyncio.run(run_soak(SoakConfig(server.url, args.model, clients=args.clients, requests=64, seed=1)))
        wait_until_idle(server.url)
        rss_start = resident_bytes(server.process.pid)
        before = scrape_metrics(server.url)
        seed, elapsed = 2, 0.0
        while elapsed < args.minutes * 60:
            config = SoakConfig(server.url, args.model, clients=args.clients, requests=None,
                                duration=args.round_seconds, seed=seed)
            report = asyncio.run(run_soak(config))
            wait_until_idle(server.url)
            elapsed += report.seconds
            rss = resident_bytes(server.process.pid)
            other = report.requests - report.outcomes["completed"] - report.outcomes["disconnected"]
            for key, value in (("requests", report.requests), ("completed", report.outcomes["completed"]),
                               ("disconnected", report.outcomes["disconnected"]), ("other", other),
                               ("edits", report.edits)):
                totals[key] += value
            rounds.append({"minute": round(elapsed / 60, 2), "requests": report.requests,
                           "outcomes": dict(report.outcomes), "rss_mib": round(rss / MIB, 1),
                           "problems": report.problems})
            print(f"{elapsed / 60:5.1f} min: {report.requests} requests {dict(report.outcomes)}, "
                  f"RSS {rss / MIB:.1f} MiB", flush=True)
            seed += 1
        after = wait_until_idle(server.url)
        rss_end = resident_bytes(server.process.pid)
    chat_ok = ("kvchat_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"model": args.model, "clients": args.clients, "minutes": args.minutes, "parallel": 16,
                     "ctx_size": 8192},
        "totals": totals,
        "server_counted_200": after[chat_ok] - before[chat_ok],
        "rss_after_warm_up_mib": round(rss_start / MIB, 1),
        "rss_end_mib": round(rss_end / MIB, 1),
        "rss_growth_mib": round((rss_end - rss_start) / MIB, 1),
        "idle_at_end": {name: after[(name, labels)] for name, labels in (
            ("kvchat_requests_active", ()), ("kvchat_requests_queued", ()), ("kvchat_cache_locked_tokens", ()),
            ("kvchat_sequences", (("state", "active"),)))},
        "rounds": rounds,
    }
    if args.fuzz_examples:
        env = {**os.environ, "KVCHAT_FUZZ_EXAMPLES": str(args.fuzz_examples)}
        fuzz = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_server_fuzz.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        summary = fuzz.stdout.strip().splitlines()[-1] if fuzz.stdout.strip() else fuzz.stderr[-500:]
        result["fuzz"] = {"examples_per_operation": args.fuzz_examples, "passed": fuzz.returncode == 0,
                          "summary": summary}
        print(f"schemathesis, {args.fuzz_examples} examples per operation: {summary}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
