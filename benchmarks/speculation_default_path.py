"""Speculation on the path real clients take by default: fresh chats, default
temperature, no seed, speculation "auto" against "off", in one run.

Speculative decoding pays where drafts hold (code edits, predictions, replies that
repeat the conversation: benchmarks/speculative.py). Here they seldom do, and the
figure is what drafting costs there: decode tokens per second after the first
token, summed over eight one-turn chats (different questions, up to 160 tokens
each), with the engine's default sampling (temperature 0.8, top-k 40, top-p 0.95,
min-p 0.05) and greedy, speculation on against off. (A third arm, the policy
before 2026-12-06 23:00 UTC, was patched in until the cost table it patched gave
way to the kernel fit of 2026-12-08; its figures stay in docs/benchmarks.md.)
A short generation warms the process up first (the first engine of a process ran
some 25% slower). Qwen2.5-Coder 0.5B; one engine
at a time (a new one per arm and repetition, so every arm starts with a fresh
engine's drafting state), arms in turn. Target: on at least 0.97x off (drafting must
not slow down what it cannot speed up).

Writes benchmarks/results/speculation_default_path.json.

    python benchmarks/speculation_default_path.py [--repeats 3] [--max-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.chat import complete
from kvchat.llama import Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine

RESULTS = Path(__file__).parent / "results" / "speculation_default_path.json"
QUESTIONS = [
    "Explain how the gears of a bicycle work.",
    "Write a short poem about rain in the city.",
    "What are three tips for learning Python?",
    "Describe the water cycle for a ten-year-old.",
    "Write a Python function that reverses a string, with a docstring.",
    "Tell me about the history of tea.",
    "How do I choose a good pair of running shoes?",
    "What is the difference between a list and a tuple in Python?",
]
TARGET = 0.97


def run_arm(model: Model, arm: str, greedy: bool, max_tokens: int) -> dict[str, float]:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens) if greedy else SamplingParams(max_tokens=max_tokens)
    tokens = drafted = accepted = 0
    seconds = 0.0
    speculation = "off" if arm == "off" else "auto"
    with Engine(model, EngineSettings(n_ctx=4096, speculation=speculation)) as engine:
        for question in QUESTIONS:
            stream = complete(engine, [{"role": "user", "content": question}], sampling=sampling)
            first = None
            usage = None
            for delta in stream:
                if first is None:
                    first = time.perf_counter()
                if delta.usage is not None:
                    usage = delta.usage
            assert first is not None and usage is not None
            seconds += time.perf_counter() - first
            tokens += usage.completion_tokens - 1
            drafted += usage.draft_tokens
            accepted += usage.accepted_draft_tokens
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "draft_tokens": drafted,
            "accepted_draft_tokens": accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    modes = {"default_sampling": False, "greedy": True}
    arms = ("off", "auto")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {mode: {arm: [] for arm in arms} for mode in modes}
    with Model(resolve(args.model)) as model:
        run_arm(model, "off", True, 16)  # warm-up, not recorded
        for repeat in range(args.repeats):
            for mode, greedy in modes.items():
                for arm in arms:
                    run = run_arm(model, arm, greedy, args.max_tokens)
                    runs[mode][arm].append(run)
                    print(f"  repeat {repeat + 1} {mode:>16} {arm:>11}: {run['tok_s']:5.1f} tok/s, "
                          f"drafted {run['draft_tokens']}, accepted {run['accepted_draft_tokens']}")
    summary = {}
    for mode, by_arm in runs.items():
        median = {arm: statistics.median(r["tok_s"] for r in by_arm[arm]) for arm in by_arm}
        summary[mode] = {"off_tok_s": median["off"], "auto_tok_s": median["auto"],
                         "ratio": median["auto"] / median["off"], "target": TARGET}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "questions": QUESTIONS,
        "summary": summary,
        "runs": runs,
    }
    print()
    for mode, figures in summary.items():
        print(f"{mode:>16}: off {figures['off_tok_s']:.1f} tok/s, auto {figures['auto_tok_s']:.1f} tok/s: "
              f"{figures['ratio']:.2f}x (target >= {TARGET})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
