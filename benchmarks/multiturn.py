"""Multi-turn chat where every call sends the whole history (the way stateless
clients such as Semantic Kernel and OpenAI-style clients call).

Scenarios, all in one run on one model:
- `single`: one 16-turn conversation, with the prefix cache on and off;
- `interleaved`: 8 users whose turns interleave (user 1 turn 1, user 2 turn 1,
  ...), cache on, with a KV pool that holds them all.

Per call it records the prompt, new, cached and evaluated tokens and the time
to first token. "New tokens" are the tokens the caller added since its previous
call (the user message); the previous answer's last token is also evaluated,
because a request returns its last sampled token without evaluating it.

    python benchmarks/multiturn.py [--mode tokens|chat] [--model qwen2.5-coder-0.5b-instruct] [--turns 16]

`--mode chat` sends messages through `kvchat.chat.complete` (the model's own chat
template) instead of token lists. Prints tables and writes
benchmarks/results/multiturn.json (tokens) or multiturn_chat.json (chat).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.chat import complete
from kvchat.llama import Batch, Context, ContextParams, Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402
from prefill_shape import chunk_ms, fill, synthetic_tokens  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "multiturn.json"
TOPICS = ["rivers", "bridges", "bees", "volcanoes", "libraries", "clocks", "kites", "harbours"]


def user_message(user: int, turn: int) -> str:
    """A deterministic user message of roughly 70-90 tokens."""
    topic = TOPICS[user % len(TOPICS)]
    return (
        f"Turn {turn} from user {user}. I am writing notes about {topic} and I would like your help. "
        f"Please list three short facts about {topic} that a curious student might not know yet, "
        f"then suggest one question about {topic} that I could research next week at the library, "
        f"and keep the whole answer brief, friendly and easy to read. This is message number {turn}."
    )


class Conversation:
    """A chat history kept as token ids, rendered in ChatML-like turns with plain text."""

    def __init__(self, model: Model, user: int) -> None:
        self.model = model
        self.user = user
        self.tokens = model.tokenize(f"A helpful assistant talks with user {user}.\n", add_special=True)
        self.unsent = len(self.tokens)  # the opening line is new on the first call

    def ask(self, engine: Engine, turn: int, answer_tokens: int) -> dict[str, float]:
        new = self.model.tokenize(f"\nUser: {user_message(self.user, turn)}\nAssistant:")
        self.tokens = self.tokens + new
        n_new, self.unsent = self.unsent + len(new), 0
        done = engine.submit(self.tokens, SamplingParams(temperature=0, max_tokens=answer_tokens)).collect()
        self.tokens = self.tokens + list(done.token_ids)
        u = done.usage
        return {"turn": turn, "user": self.user, "prompt_tokens": u.prompt_tokens, "new_tokens": n_new,
                "cached_tokens": u.cached_tokens, "evaluated_tokens": u.evaluated_tokens,
                "ttft_s": u.time_to_first_token, "completion_tokens": u.completion_tokens}


class ChatConversation:
    """The same conversation as chat messages through `kvchat.chat.complete` (the
    model's own template, token-faithful history): what a chat client sends."""

    def __init__(self, model: Model, user: int) -> None:
        self.user = user
        self.messages: list[dict] = [{"role": "system", "content": f"A helpful assistant talks with user {user}."}]
        self.previous = 0  # prompt + completion tokens of the previous call

    def ask(self, engine: Engine, turn: int, answer_tokens: int) -> dict[str, float]:
        self.messages.append({"role": "user", "content": user_message(self.user, turn)})
        reply = complete(engine, self.messages, sampling=SamplingParams(temperature=0, max_tokens=answer_tokens),
                         ).collect()
        self.messages.append(reply.to_message())
        u = reply.usage
        n_new = u.prompt_tokens - self.previous  # template text and the new message
        self.previous = u.prompt_tokens + u.completion_tokens
        return {"turn": turn, "user": self.user, "prompt_tokens": u.prompt_tokens, "new_tokens": n_new,
                "cached_tokens": u.cached_tokens, "evaluated_tokens": u.evaluated_tokens,
                "ttft_s": u.time_to_first_token, "completion_tokens": u.completion_tokens}


def bare_prefill_seconds(model: Model, settings: EngineSettings, cached: int, new: int, repeats: int = 3) -> float:
    """Best time of one llama_decode of `new` tokens on top of `cached` resident ones:
    the backend's own cost for a turn, without the engine (attention grows with `cached`)."""
    params = ContextParams(n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_seq_max=settings.n_seq_max)
    tokens = synthetic_tokens(cached + new)
    with Context(model, params) as ctx, Batch(settings.n_batch) as batch:
        fill(ctx, batch, tokens, cached)
        return chunk_ms(ctx, batch, tokens, cached, new, repeats) / 1000


def single(model: Model, settings: EngineSettings, turns: int, answer_tokens: int,
           kind: type = Conversation) -> list[dict[str, float]]:
    with Engine(model, settings) as engine:
        conversation = kind(model, 0)
        return [conversation.ask(engine, turn, answer_tokens) for turn in range(1, turns + 1)]


def interleaved(model: Model, settings: EngineSettings, users: int, turns: int,
                answer_tokens: int, kind: type = Conversation) -> list[dict[str, float]]:
    with Engine(model, settings) as engine:
        conversations = [kind(model, u) for u in range(users)]
        return [c.ask(engine, turn, answer_tokens) for turn in range(1, turns + 1) for c in conversations]


def print_single(on: list[dict], off: list[dict]) -> None:
    print("\nsingle conversation, full history on every call")
    print(f"{'turn':>4} {'prompt':>7} {'new':>5} {'eval on':>8} {'TTFT on':>8} {'eval off':>9} {'TTFT off':>9} {'speed-up':>8}")
    for a, b in zip(on, off):
        print(f"{a['turn']:>4} {a['prompt_tokens']:>7} {a['new_tokens']:>5} {a['evaluated_tokens']:>8} "
              f"{a['ttft_s']:>8.3f} {b['evaluated_tokens']:>9} {b['ttft_s']:>9.3f} {b['ttft_s'] / a['ttft_s']:>7.1f}x")


def summarise(on: list[dict], off: list[dict], mixed: list[dict]) -> dict[str, float]:
    later = on[1:]  # the first call has nothing to reuse
    overhead = max(r["evaluated_tokens"] / r["new_tokens"] for r in later)
    new_mixed = sum(r["new_tokens"] for r in mixed)
    return {
        "single_max_evaluated_over_new_after_turn_1": overhead,
        "single_ttft_last_over_turn_2": on[-1]["ttft_s"] / on[1]["ttft_s"],
        "single_ttft_speedup_last_turn": off[-1]["ttft_s"] / on[-1]["ttft_s"],
        "interleaved_evaluated_over_new": sum(r["evaluated_tokens"] for r in mixed) / new_mixed,
        "interleaved_evaluated_over_new_after_first_turns": (
            sum(r["evaluated_tokens"] for r in mixed if r["turn"] > 1)
            / sum(r["new_tokens"] for r in mixed if r["turn"] > 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--user-turns", type=int, default=8, help="turns per user in the interleaved scenario")
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--mode", choices=["tokens", "chat"], default="tokens",
                        help="tokens: token lists; chat: messages through kvchat.chat.complete")
    args = parser.parse_args()
    kind = Conversation if args.mode == "tokens" else ChatConversation
    results = RESULTS.with_name(f"multiturn_{args.mode}.json") if args.mode != "tokens" else RESULTS

    model = Model(resolve(args.model))
    cache_on = EngineSettings(n_ctx=16384, max_running=8, n_seq_max=32)
    cache_off = EngineSettings(n_ctx=16384, max_running=8, n_seq_max=32, prefix_cache=False)
    on = single(model, cache_on, args.turns, args.answer_tokens, kind)
    off = single(model, cache_off, args.turns, args.answer_tokens, kind)
    print_single(on, off)
    mixed = interleaved(model, cache_on, args.users, args.user_turns, args.answer_tokens, kind)
    print(f"\n{args.users} interleaved users, {args.user_turns} turns each (cache on)")
    print(f"{'turn':>4} {'mean TTFT':>10} {'new':>6} {'evaluated':>10}")
    for turn in range(1, args.user_turns + 1):
        rows = [r for r in mixed if r["turn"] == turn]
        print(f"{turn:>4} {sum(r['ttft_s'] for r in rows) / len(rows):>10.3f} "
              f"{sum(r['new_tokens'] for r in rows):>6} {sum(r['evaluated_tokens'] for r in rows):>10}")
    summary = summarise(on, off, mixed)
    floor = [bare_prefill_seconds(model, cache_on, r["cached_tokens"], r["evaluated_tokens"]) for r in (on[1], on[-1])]
    summary["bare_decode_turn_last_over_turn_2"] = floor[1] / floor[0]
    print("\nsummary")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}")
    model.close()
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": args.model, "mode": args.mode, "answer_tokens": args.answer_tokens, "summary": summary,
        "single_cache_on": on, "single_cache_off": off, "interleaved_cache_on": mixed,
    }, indent=2) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
