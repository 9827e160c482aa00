"""16 turns through Semantic Kernel's chat interface: kvchat's service with the
prefix cache on, against the same service on an engine with the cache off.

Semantic Kernel sends the whole ChatHistory on every call. Prints the time to
first token per turn for both and writes benchmarks/results/semantic_kernel_chat.json.

    python benchmarks/semantic_kernel_chat.py [--turns 16] [--model qwen2.5-coder-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from semantic_kernel.contents import ChatHistory

from kvchat import Engine, EngineSettings
from kvchat.integrations.semantic_kernel import KVChatCompletion, KVChatPromptExecutionSettings
from kvchat.llama import Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402
from multiturn import user_message  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "semantic_kernel_chat.json"


async def conversation(service: KVChatCompletion, turns: int, answer_tokens: int) -> list[dict]:
    settings = KVChatPromptExecutionSettings(max_tokens=answer_tokens, temperature=0.0)
    history = ChatHistory(system_message="A helpful assistant talks with user 0.")
    rows = []
    for turn in range(1, turns + 1):
        history.add_user_message(user_message(0, turn))
        reply = await service.get_chat_message_content(history, settings)
        history.add_message(reply)
        usage = reply.metadata["usage"]
        rows.append({"turn": turn, **{k: usage[k] for k in ("prompt_tokens", "cached_tokens", "evaluated_tokens",
                                                            "completion_tokens", "time_to_first_token")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    model = Model(resolve(args.model))
    results = {}
    for label, cache in (("cache_on", True), ("cache_off", False)):
        with Engine(model, EngineSettings(n_ctx=16384, max_running=8, n_seq_max=32, prefix_cache=cache)) as engine:
            results[label] = asyncio.run(conversation(KVChatCompletion(engine), args.turns, args.answer_tokens))
    model.close()
    on, off = results["cache_on"], results["cache_off"]
    print(f"{'turn':>4} {'prompt':>7} {'eval on':>8} {'TTFT on':>8} {'TTFT off':>9} {'off / on':>9}")
    for a, b in zip(on, off):
        print(f"{a['turn']:>4} {a['prompt_tokens']:>7} {a['evaluated_tokens']:>8} {a['time_to_first_token']:>8.3f} "
              f"{b['time_to_first_token']:>9.3f} {b['time_to_first_token'] / a['time_to_first_token']:>8.1f}x")
    speedup = off[-1]["time_to_first_token"] / on[-1]["time_to_first_token"]
    print(f"\nturn {args.turns}: time to first token {speedup:.1f}x lower with the prefix cache")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "model": args.model, "answer_tokens": args.answer_tokens, "ttft_speedup_last_turn": speedup,
        "cache_on": on, "cache_off": off}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
