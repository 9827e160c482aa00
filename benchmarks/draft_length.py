"""The longest draft (`max_draft_tokens`): code edits with their prediction, one run.

The `code_edit_prediction` scenario of benchmarks/speculative.py (Qwen2.5-Coder
0.5B, temperature 0, up to 256 tokens), in process, with `max_draft_tokens` 32,
48 and 62 and with speculation off. Each task runs once per setting, the order
rotating task by task so that the machine's drift hits all alike, each call on a
new engine (only one exists at a time; see benchmarks/speculative.py). The
figure is decode tok/s over all tasks (tokens after the first over the time from
the first token to the last), and each setting's ratio to speculation off.

Writes benchmarks/results/draft_length.json.

    python benchmarks/draft_length.py [--tasks 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
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
from kvchat.llama import Model
from kvchat.models import resolve

RESULTS = Path(__file__).parent / "results" / "draft_length.json"
SETTINGS = {"off": {"speculation": "off"}, "32": {"max_draft_tokens": 32}, "48": {"max_draft_tokens": 48},
            "62": {"max_draft_tokens": 62}}


def decode(model: Model, setting: dict, prompt: list[int], prediction: tuple[int, ...],
           max_tokens: int) -> tuple[int, float]:
    """(tokens after the first, seconds from the first token to the last) on a new engine."""
    with Engine(model, EngineSettings(n_ctx=16384, **setting)) as engine:
        return decode_span(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                prediction=prediction)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tasks", type=int, default=len(TASKS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    model = Model(resolve(args.model))
    tokenizer = ChatTokenizer(model)
    totals = {name: [0, 0.0] for name in SETTINGS}
    names = list(SETTINGS)
    for round_ in range(args.rounds):
        for index, task in enumerate(TASKS[: args.tasks]):
            prompt = tokenizer.encode(edit_messages(task))
            prediction = tuple(model.tokenize(task.code, add_special=False, parse_special=False))
            shift = (index + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                tokens, seconds = decode(model, SETTINGS[name], prompt, prediction, args.max_tokens)
                totals[name][0] += tokens
                totals[name][1] += seconds
            print(f"  round {round_ + 1} {task.name}: "
                  + ", ".join(f"{n} {t / s:.1f}" for n, (t, s) in totals.items() if s), flush=True)
    model.close()
    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "tasks": args.tasks,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "decode_tok_s": rates,
        "over_off": {name: rate / rates["off"] for name, rate in rates.items()},
        "over_32": {name: rate / rates["32"] for name, rate in rates.items()},
    }
    print("\n" + "\n".join(f"{name:>4}: {rate:.1f} tok/s, {results['over_off'][name]:.2f}x off, "
                           f"{results['over_32'][name]:.3f}x 32" for name, rate in rates.items()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
