"""Decode speed of grammar-constrained output: the grammar checked lazily against
checked on every token, and no grammar at all, in one run.

Structured output (`response_format`), forced tool calls (`tool_choice` "required" or
a named function) and the answer after a tool round all sample under a grammar.
Checking every token of the vocabulary against it (Qwen: 151,936 tokens) costs
about as much as a decode step of a small model. `SamplerChain` checks lazily: the
pick made without the grammar is checked, and only a rejected pick is made again
among all allowed tokens. This script times three arms on the same requests:

- `none`: the requests without a grammar (the backend's decode speed);
- `every_token`: the grammar checked on every token of every step (what the
  chain did before; here by making the lazy check reject every pick, so each
  step also makes one unconstrained pick, about 0.3 ms);
- `lazy`: the grammar as `SamplerChain` applies it.

Qwen2.5-Coder 0.5B, greedy, speculation off (so every arm samples once per
decode step); one engine at a time, a new one per arm and repetition, arms in
turn. Figure: decode tokens per second after the first token, summed over the
requests; ratio lazy / every_token (and lazy / none) from the same run.

Writes benchmarks/results/grammar_sampling.json.

    python benchmarks/grammar_sampling.py [--repeats 3] [--max-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.chat import chat_tokenizer
from kvchat.chat.response_format import grammar_for_response_format
from kvchat.llama import Model, SamplerChain
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine
from stream_timing import decode_span

RESULTS = Path(__file__).parent / "results" / "grammar_sampling.json"
PRODUCT = {
    "type": "json_schema",
    "json_schema": {"name": "product", "schema": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "price_eur": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "description": {"type": "string"},
        },
        "required": ["name", "price_eur", "tags", "description"],
    }},
}
REQUESTS = [
    "Describe a waterproof hiking boot as a product listing.",
    "Describe a stainless steel coffee grinder as a product listing.",
    "Describe a lightweight bike helmet as a product listing.",
    "Describe a wool winter coat as a product listing.",
]


def run_arm(model: Model, arm: str, max_tokens: int) -> dict[str, float]:
    grammar = None if arm == "none" else grammar_for_response_format(PRODUCT)
    tokens = seconds = 0.0
    patch = mock.patch.object(SamplerChain, "_grammar_allows", lambda self, token: False) if arm == "every_token" \
        else mock.patch.object(SamplerChain, "_grammar_allows", SamplerChain._grammar_allows)
    with patch, Engine(model, EngineSettings(n_ctx=4096, speculation="off", prefix_cache=False)) as engine:
        tokenizer = chat_tokenizer(engine)
        for text in REQUESTS:
            prompt = tokenizer.encode([{"role": "user", "content": text}])
            sampling = SamplingParams(temperature=0, max_tokens=max_tokens, grammar=grammar)
            count, span = decode_span(engine.submit(prompt, sampling))
            tokens += count
            seconds += span
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    arms = ("none", "every_token", "lazy")
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    with Model(resolve(args.model)) as model:
        for repeat in range(args.repeats):
            for arm in arms:
                runs[arm].append(run_arm(model, arm, args.max_tokens))
                print(f"  repeat {repeat + 1} {arm:>12}: {runs[arm][-1]['tok_s']:6.1f} tok/s")
    median = {arm: statistics.median(r["tok_s"] for r in runs[arm]) for arm in arms}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "requests": REQUESTS,
        "decode_tok_s_median": median,
        "lazy_over_every_token": median["lazy"] / median["every_token"],
        "lazy_over_none": median["lazy"] / median["none"],
        "runs": runs,
    }
    print(f"\ndecode tok/s (median of {args.repeats}): no grammar {median['none']:.1f}, "
          f"grammar on every token {median['every_token']:.1f}, lazy {median['lazy']:.1f}")
    print(f"lazy / every token: {results['lazy_over_every_token']:.2f}x; lazy / no grammar: "
          f"{results['lazy_over_none']:.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
