"""kvchat serve against llama.cpp's own llama-server and llama-cpp-python's bundled
OpenAI server, same clients.

Servers (each started fresh, on the same model file and context size):
- `kvchat`: `kvchat serve`;
- `llama-server`: llama.cpp's server at its defaults (4 slots in one unified KV
  cache, its host-memory prompt cache), built from the llama.cpp kvchat runs on by
  benchmarks/llama_server.py on first use; `llama-server-spec`: the same with
  `--spec-default` (n-gram drafts);
- `peer`: `python -m llama_cpp.server` with its default prompt handling (it
  reuses only the prefix it still holds from the previous request);
- `peer-cache`: the same with its RAM prompt cache on (`--cache true --cache_type ram`).

The peer runs from its own virtualenv, benchmarks/.peer-venv, created on first
use, so the project's package versions stay untouched. Both servers get the
same CPU threads. The peer runs with `--interrupt_requests false`: by default it
ends a stream early (sending [DONE]) as soon as another request waits, which
would cut answers short whenever clients overlap.

Scenarios (benchmarks/http_clients.py; every call resends the whole history):
(a) `single`: one conversation; (b) `interleaved`: several users whose turns
interleave, one request at a time; (c) `concurrent`: the same users at once.

    python benchmarks/peers.py [--single-turns 16] [--users 8] [--turns 8] [--max-tokens 64] [--quick]

Prints per-turn TTFT, wall time, aggregate tokens/s and kvchat/peer ratios;
writes benchmarks/results/peers.json and plots scenario (b)'s TTFT per turn to
docs/images/peers_ttft.png (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from http_clients import ScenarioRun, concurrent, print_progress, round_robin, running_server, summarize  # noqa: E402
from llama_server import NO_AMX, llama_server_binary  # noqa: E402
from machine_info import machine  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "peers.json"
PLOT = HERE.parent / "docs" / "images" / "peers_ttft.png"
PEER_VENV = HERE / ".peer-venv"
PEER_PACKAGE = "llama-cpp-python[server]==0.3.36"
KVCHAT = Path(sys.executable).with_name("kvchat")
SERVERS = ("kvchat", "llama-server", "llama-server-spec", "peer", "peer-cache")
SCENARIOS = ("single", "interleaved", "concurrent")


def parse_args() -> argparse.Namespace:
    """Command-line options; --quick shrinks the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="packaged model name (also the model id)")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--keep-others", action="store_true",
                   help="keep the results of servers not run now from the existing results file")
    p.add_argument("--single-turns", type=int, default=16, help="turns of scenario (a)")
    p.add_argument("--users", type=int, default=8, help="users of scenarios (b) and (c)")
    p.add_argument("--turns", type=int, default=8, help="turns per user in scenarios (b) and (c)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx-size", type=int, default=8192,
                   help="kvchat --ctx-size (cells shared by all requests) and the peer's --n_ctx (one sequence)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of either server")
    p.add_argument("--out", type=Path, help=f"results file (default: {RESULTS}; with --quick: in the temp dir)")
    p.add_argument("--plot", type=Path, help=f"TTFT-per-turn plot (default: {PLOT}; with --quick: in the temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 turns, 2 users, 16 tokens")
    args = p.parse_args()
    if args.quick:
        args.single_turns, args.users, args.turns, args.max_tokens = 2, 2, 2, 16
    tmp = Path(tempfile.gettempdir())
    args.out = args.out or (tmp / RESULTS.name if args.quick else RESULTS)
    args.plot = args.plot or (tmp / PLOT.name if args.quick else PLOT)
    return args


# ---------------------------------------------------------------- servers


_PEER_READY = "import sys, llama_cpp.server; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())"


def peer_python() -> Path:
    """The peer virtualenv's python, creating the venv and installing the peer (built
    without AMX kernels) on first use, or again if its build has them."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV}", flush=True)
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
    if subprocess.run([str(python), "-c", _PEER_READY], check=False, capture_output=True).returncode:
        print(f"installing {PEER_PACKAGE} into {PEER_VENV} (built from source without AMX)", flush=True)
        env = {**os.environ, "CFLAGS": NO_AMX, "CXXFLAGS": NO_AMX}
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-cache-dir",
                        "--no-binary", "llama-cpp-python", PEER_PACKAGE], check=True, env=env)
    return python


@dataclass
class Server:
    """How to start one server and when it is ready."""

    name: str
    command: Callable[[int], list[str]]
    ready_path: str


def kvchat_command(args: argparse.Namespace, *options: str) -> Callable[[int], list[str]]:
    """`kvchat serve` on args.model, args.ctx_size and args.threads, with `options`, on a port."""
    return lambda port: [
        str(KVCHAT), "serve", "--model", args.model, "--port", str(port),
        "--ctx-size", str(args.ctx_size), "--threads", str(args.threads), *options,
    ]


def llama_server_command(args: argparse.Namespace, *options: str) -> Callable[[int], list[str]]:
    """llama-server (built on first use) on the same model file, context and threads, with `options`."""
    binary = llama_server_binary()
    return lambda port: [
        str(binary), "-m", str(resolve(args.model)), "--alias", args.model, "--host", "127.0.0.1",
        "--port", str(port), "-c", str(args.ctx_size), "-t", str(args.threads), "-tb", str(args.threads), *options,
    ]


def kvchat_server(args: argparse.Namespace) -> Server:
    """`kvchat serve` with its default --parallel."""
    return Server("kvchat", kvchat_command(args), "/health")


def peer_server(args: argparse.Namespace, name: str, python: Path) -> Server:
    """llama-cpp-python's server; `peer-cache` turns its RAM prompt cache on."""
    cache = ["--cache", "true", "--cache_type", "ram"] if name == "peer-cache" else []
    return Server(name, lambda port: [
        str(python), "-m", "llama_cpp.server", "--model", str(resolve(args.model)), "--model_alias", args.model,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.ctx_size),
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
        "--interrupt_requests", "false", *cache,
    ], "/v1/models")


def llama_server(args: argparse.Namespace, name: str) -> Server:
    """llama.cpp's llama-server at its defaults; `llama-server-spec` adds `--spec-default`."""
    spec = ["--spec-default"] if name == "llama-server-spec" else []
    return Server(name, llama_server_command(args, *spec), "/health")


# ---------------------------------------------------------------- runs


def run_scenario(base_url: str, scenario: str, label: str, args: argparse.Namespace) -> ScenarioRun:
    """One scenario against a running server. Each scenario has its own seed, so
    none finds another's conversations in the cache; servers share the seeds."""
    seed = SCENARIOS.index(scenario) + 1
    users, turns = (1, args.single_turns) if scenario == "single" else (args.users, args.turns)
    progress = print_progress(f"{label} {scenario}", users * turns, every=users if users > 1 else 4)
    drive = concurrent if scenario == "concurrent" else round_robin
    return asyncio.run(drive(base_url, args.model, users, turns, args.max_tokens, seed=seed, progress=progress))


def run_server(server: Server, args: argparse.Namespace) -> dict[str, dict]:
    """Start a server and run every scenario against it; summaries by scenario."""
    log = Path(tempfile.gettempdir()) / f"kvchat-peers-{server.name}.log"
    print(f"\n{server.name}: starting (log: {log})", flush=True)
    with running_server(server.command, server.ready_path, log) as base_url:
        return {s: summarize(run_scenario(base_url, s, server.name, args)) for s in SCENARIOS}


def ratios(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """kvchat / peer for wall time, aggregate tokens/s and TTFT p50, by peer and scenario."""
    keys = ("wall_s", "tokens_per_s", "ttft_p50_s")

    def ratio(mine: float | None, theirs: float | None) -> float | None:
        return None if mine is None or not theirs else mine / theirs

    return {peer: {s: {k: ratio(results["kvchat"][s][k], results[peer][s][k]) for k in keys} for s in SCENARIOS}
            for peer in results if peer != "kvchat" and "kvchat" in results}


# ---------------------------------------------------------------- output


def print_tables(results: dict[str, dict[str, dict]], ratio: dict) -> None:
    """Per scenario: per-turn TTFT by server, then totals and kvchat/peer ratios."""
    names = list(results)
    for s in SCENARIOS:
        print(f"\n== {s}: median TTFT (s) per turn")
        print(f"{'turn':>4} " + " ".join(f"{n:>10}" for n in names))
        for t in range(len(results[names[0]][s]["ttft_per_turn_s"])):
            print(f"{t + 1:>4} " + " ".join(_fmt(results[n][s]["ttft_per_turn_s"][t], 10, ".3f") for n in names))
        print(f"\n{'server':>10} {'requests':>8} {'failed':>6} {'wall s':>8} {'tok/s':>7} {'TTFT p50':>9} {'p90':>7} "
              f"{'p99':>7}")
        for n in names:
            r = results[n][s]
            figures = (_fmt(r["tokens_per_s"], 7, ".1f"), _fmt(r["ttft_p50_s"], 9, ".3f"),
                       _fmt(r["ttft_p90_s"], 7, ".3f"), _fmt(r["ttft_p99_s"], 7, ".3f"))
            print(f"{n:>10} {r['requests']:>8} {r['failed']:>6} {r['wall_s']:>8.1f} " + " ".join(figures))
        for peer, by_scenario in ratio.items():
            q = by_scenario[s]
            print(f"kvchat/{peer}: wall {_fmt(q['wall_s'], 0, '.2f')}x, tok/s {_fmt(q['tokens_per_s'], 0, '.2f')}x, "
                  f"TTFT p50 {_fmt(q['ttft_p50_s'], 0, '.2f')}x")


def _fmt(value: float | None, width: int, spec: str) -> str:
    """`value` formatted, or "-" when there was nothing to measure."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def plot(results: dict[str, dict[str, dict]], path: Path, title: str) -> None:
    """Scenario (b)'s median TTFT per turn, one line per server, log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_scenario in results.items():
        ttft = by_scenario["interleaved"]["ttft_per_turn_s"]
        points = [(turn, t) for turn, t in enumerate(ttft, start=1) if t is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="turn", ylabel="median time to first token (s)", yscale="log", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    args = parse_args()
    python = peer_python() if any(n.startswith("peer") for n in args.servers) else None

    def server(name: str) -> Server:
        if name == "kvchat":
            return kvchat_server(args)
        return llama_server(args, name) if name.startswith("llama-server") else peer_server(args, name, python)

    servers = [server(n) for n in args.servers]
    settings = {k: getattr(args, k) for k in ("model", "servers", "single_turns", "users", "turns", "max_tokens",
                                               "ctx_size", "threads")}
    settings["peer_package"] = PEER_PACKAGE
    results: dict[str, dict] = {}
    if args.keep_others and args.out.exists():  # re-run some servers, keep the others' results
        results = {name: r for name, r in json.loads(args.out.read_text())["results"].items()
                   if name not in args.servers}
    for server in servers:  # written after each server, so a late failure keeps the earlier results
        results[server.name] = run_server(server, args)
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                  "settings": settings, "results": results, "ratios": ratios(results)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    ratio = ratios(results)
    print_tables(results, ratio)
    plot(results, args.plot, f"{args.users} interleaved users, {args.max_tokens} tokens per answer")
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
