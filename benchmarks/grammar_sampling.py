"""Structured output on llguidance: its decode speed against free text, with and
without forced tokens, against llama.cpp's GBNF sampler, and what hostile grammars
cost another request, in one run.

Arms (Qwen2.5-Coder 0.5B, greedy, speculation off so every arm decodes one step at
a time; the same four product-listing prompts; a new engine per arm and repetition,
arms in turn):

- `free_text`: the prompts without a grammar (the engine's decode speed);
- `json_schema`: the prompts under a JSON schema, as kvchat serves it (llguidance,
  forced tokens appended without sampling and verified in the next batch call);
- `json_schema_no_forced`: the same with forced tokens switched off (every token
  sampled, a mask computed where the model's pick is refused);
- `llama_cpp_free_text` / `llama_cpp_gbnf`: llama-cpp-python's own `Llama` with and
  without the schema as llama.cpp GBNF (`response_format` with a schema: llama.cpp's
  grammar sampler, which kvchat used before). Its loop differs from the engine's, so
  only its ratio to its own free text compares with kvchat's.

Figure: decode tokens per second after the first token, summed over the prompts
(median of the repetitions); the ratios come from the same run.

Hostile grammars: a plain 128-token request decodes alone, next to another plain
request, and next to each hostile structured request of issue 29 (up to 512 tokens;
some end within a few: the neighbour's token count is reported) and an ordinary
JSON one; its decode rate next to each is reported against both (target: >= 0.9x).
Next to another plain request is the backend's floor: two sequences in one call.

Writes benchmarks/results/grammar_sampling.json.

    python benchmarks/grammar_sampling.py [--repeats 3] [--max-tokens 160]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

from kvchat import Engine, EngineSettings, Grammar, SamplingParams
from kvchat.chat import chat_tokenizer
from kvchat.engine.grammar import GrammarMatcher
from kvchat.llama import Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine
from stream_timing import decode_span

RESULTS = Path(__file__).parent / "results" / "grammar_sampling.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "price_eur": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "description": {"type": "string"},
    },
    "required": ["name", "price_eur", "tags", "description"],
}
REQUESTS = [
    "Describe a waterproof hiking boot as a product listing in JSON.",
    "Describe a stainless steel coffee grinder as a product listing in JSON.",
    "Describe a lightweight bike helmet as a product listing in JSON.",
    "Describe a wool winter coat as a product listing in JSON.",
]
HOSTILE = {
    "nul-pattern": {"type": "string", "pattern": "^\\x00$"},
    "optional-groups-2000": {"type": "string", "pattern": "(a?){1000}(a?){1000}"},
    "optional-groups-16000": {"type": "string", "pattern": "^" + "(a?){1000}" * 16 + "$"},
    "alternatives-1000-star": {"type": "string", "pattern": "^(" + "|".join(f"w{i}" for i in range(1000)) + ")*$"},
    "literal-1000-x1000": {"type": "string", "pattern": "(" + "x" * 1000 + "){1000}"},
    "enum-3000": {"enum": [f"{i:0200d}" for i in range(3000)]},
    "const-400k": {"const": "ab" * 200_000},
    "maxItems-100000": {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
    "nesting-100": {"type": "array", "items": {"type": "integer"}},
    "product-listing (not hostile)": SCHEMA,
}
for _ in range(100):
    HOSTILE["nesting-100"] = {"type": "array", "items": HOSTILE["nesting-100"]}
PLAIN = "Write a short story about a lighthouse keeper."


def engine_settings(**options) -> EngineSettings:
    return EngineSettings(n_ctx=8192, speculation="off", prefix_cache=False, **options)


def run_engine_arm(model: Model, arm: str, max_tokens: int) -> dict[str, float]:
    grammar = None if arm == "free_text" else Grammar.json_schema(SCHEMA)
    patch = (mock.patch.object(GrammarMatcher, "_forced_tokens", lambda self, limit: [])
             if arm == "json_schema_no_forced" else contextlib.nullcontext())
    tokens = seconds = forced = 0.0
    with patch, Engine(model, engine_settings()) as engine:
        tokenizer = chat_tokenizer(engine)
        for text in REQUESTS:
            prompt = tokenizer.encode([{"role": "user", "content": text}])
            stream = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, grammar=grammar))
            count, span = decode_span(stream)
            tokens, seconds = tokens + count, seconds + span
            forced += stream.usage.forced_tokens if stream.usage else 0
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "forced_tokens": forced}


def run_llama_cpp_arm(path: str, arm: str, max_tokens: int) -> dict[str, float]:
    from llama_cpp import Llama  # the reference runtime, not kvchat's backend seam

    llama = Llama(path, n_ctx=4096, verbose=False)
    fmt = {"type": "json_object", "schema": SCHEMA} if arm == "llama_cpp_gbnf" else None
    tokens = seconds = 0.0
    try:
        for text in REQUESTS:
            first = last = None
            count = 0
            for chunk in llama.create_chat_completion([{"role": "user", "content": text}], temperature=0,
                                                      max_tokens=max_tokens, stream=True, response_format=fmt):
                if chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    first, last, count = first or now, now, count + 1
            if first is not None and last is not None:
                tokens, seconds = tokens + count - 1, seconds + last - first
    finally:
        llama.close()
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def plain_rate_next_to(model: Model, other: dict | None | str, plain_tokens: int) -> tuple[float, int]:
    """Decode tok/s of a plain request, alone (`other` None), next to another plain
    request ("plain") or next to a structured request under the schema `other`; and
    how many tokens that neighbour generated (a hostile request may end at once)."""
    with Engine(model, engine_settings(max_running=2)) as engine:
        tokenizer = chat_tokenizer(engine)
        prompt = tokenizer.encode([{"role": "user", "content": PLAIN}])
        neighbour = None
        done: list[int] = []
        if other is not None:
            grammar = None if other == "plain" else Grammar.json_schema(other)
            text = "Tell me about lighthouses." if grammar is None else "Answer in JSON: anything at all, at length."
            params = SamplingParams(temperature=0, max_tokens=4 * plain_tokens, grammar=grammar)
            neighbour = engine.submit(tokenizer.encode([{"role": "user", "content": text}]), params)
            threading.Thread(target=lambda: done.append(len(neighbour.collect().token_ids)), daemon=True).start()
            time.sleep(0.3)  # the neighbour is decoding
        count, span = decode_span(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=plain_tokens)))
        if neighbour is not None:
            neighbour.cancel()
            deadline = time.monotonic() + 10
            while not done and time.monotonic() < deadline:
                time.sleep(0.01)
    return count / span, done[0] if done else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--plain-tokens", type=int, default=128)
    args = parser.parse_args()
    engine_arms = ("free_text", "json_schema", "json_schema_no_forced")
    llama_arms = ("llama_cpp_free_text", "llama_cpp_gbnf")
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in (*engine_arms, *llama_arms)}
    path = str(resolve(args.model))
    hostile: dict[str, list[float]] = {name: [] for name in ("alone", "next_to_plain", *HOSTILE)}
    neighbour_tokens: dict[str, list[int]] = {name: [] for name in hostile}
    with Model(path) as model:
        for repeat in range(args.repeats):
            for arm in engine_arms:
                runs[arm].append(run_engine_arm(model, arm, args.max_tokens))
                print(f"  repeat {repeat + 1} {arm:>22}: {runs[arm][-1]['tok_s']:6.1f} tok/s")
            for arm in llama_arms:
                runs[arm].append(run_llama_cpp_arm(path, arm, args.max_tokens))
                print(f"  repeat {repeat + 1} {arm:>22}: {runs[arm][-1]['tok_s']:6.1f} tok/s")
            for name in hostile:
                other = None if name == "alone" else "plain" if name == "next_to_plain" else HOSTILE[name]
                rate, tokens = plain_rate_next_to(model, other, args.plain_tokens)
                hostile[name].append(rate)
                neighbour_tokens[name].append(tokens)
                print(f"  repeat {repeat + 1} plain request {name:>24}: {rate:6.1f} tok/s (neighbour: {tokens} tokens)")
    median = {arm: statistics.median(r["tok_s"] for r in runs[arm]) for arm in runs}
    plain = {name: statistics.median(rates) for name, rates in hostile.items()}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "requests": REQUESTS,
        "schema": SCHEMA,
        "decode_tok_s_median": median,
        "json_schema_over_free_text": median["json_schema"] / median["free_text"],
        "json_schema_no_forced_over_free_text": median["json_schema_no_forced"] / median["free_text"],
        "llama_cpp_gbnf_over_its_free_text": median["llama_cpp_gbnf"] / median["llama_cpp_free_text"],
        "forced_share": statistics.median(r["forced_tokens"] / (r["tokens"] + len(REQUESTS))
                                          for r in runs["json_schema"]),
        "plain_request_tok_s_median": plain,
        "plain_next_to_hostile_over_alone": {name: plain[name] / plain["alone"] for name in HOSTILE},
        "plain_next_to_hostile_over_next_to_plain": {name: plain[name] / plain["next_to_plain"] for name in HOSTILE},
        "runs": runs,
        "plain_request_runs": hostile,
        "neighbour_tokens": neighbour_tokens,
    }
    print(f"\ndecode tok/s (median of {args.repeats}): " + ", ".join(f"{a} {v:.1f}" for a, v in median.items()))
    print(f"json_schema / free text: {results['json_schema_over_free_text']:.2f}x "
          f"(no forced tokens: {results['json_schema_no_forced_over_free_text']:.2f}x; "
          f"forced share {results['forced_share']:.0%}); "
          f"llama.cpp GBNF / its free text: {results['llama_cpp_gbnf_over_its_free_text']:.2f}x")
    for name in HOSTILE:
        print(f"plain request next to {name:>24}: {results['plain_next_to_hostile_over_alone'][name]:.2f}x alone, "
              f"{results['plain_next_to_hostile_over_next_to_plain'][name]:.2f}x next to a plain request")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
