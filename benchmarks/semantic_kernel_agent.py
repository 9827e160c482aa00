"""Semantic Kernel's ChatCompletionAgent on KVChatCompletion, 12 turns on one thread:
what a history reducer costs in evaluated tokens.

Three threads, the same user messages (those of benchmarks/multiturn.py):
- no reducer: the thread keeps every message;
- truncation: `ChatHistoryTruncationReducer(target_count=4, threshold_count=2)`,
  reduced before every turn as Semantic Kernel's samples do;
- summarization: `ChatHistorySummarizationReducer` (same counts) on the same
  service, which asks the model for a summary whenever it reduces.

Prints, per turn, the prompt tokens and the tokens the engine evaluated (the rest
came from the prefix cache), and writes benchmarks/results/semantic_kernel_agent.json.

    python benchmarks/semantic_kernel_agent.py [--turns 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from semantic_kernel.agents import ChatCompletionAgent, ChatHistoryAgentThread
from semantic_kernel.contents import ChatHistory, ChatHistorySummarizationReducer, ChatHistoryTruncationReducer
from semantic_kernel.functions import KernelArguments

from kvchat import Engine, EngineSettings
from kvchat.integrations.semantic_kernel import KVChatCompletion, KVChatPromptExecutionSettings
from kvchat.llama import Model
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402
from multiturn import user_message  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "semantic_kernel_agent.json"


def history_for(kind: str, service: KVChatCompletion) -> ChatHistory:
    if kind == "truncation":
        return ChatHistoryTruncationReducer(target_count=4, threshold_count=2)
    if kind == "summarization":
        return ChatHistorySummarizationReducer(service=service, target_count=4, threshold_count=2)
    return ChatHistory()


async def session(service: KVChatCompletion, kind: str, turns: int, answer_tokens: int) -> list[dict]:
    settings = KVChatPromptExecutionSettings(max_tokens=answer_tokens, temperature=0.0)
    agent = ChatCompletionAgent(
        service=service,
        name="assistant",
        instructions="A helpful assistant talks with user 0.",
        arguments=KernelArguments(settings=settings),
    )
    thread = ChatHistoryAgentThread(chat_history=history_for(kind, service))
    rows = []
    for turn in range(1, turns + 1):
        before = service.engine.stats()
        reduced = await thread.reduce() is not None
        response = await agent.get_response(messages=user_message(0, turn), thread=thread)
        after = service.engine.stats()
        usage = response.message.metadata["usage"]
        rows.append(
            {
                "turn": turn,
                "reduced": reduced,
                "prompt_tokens": usage["prompt_tokens"],
                "evaluated_tokens": usage["evaluated_tokens"],
                # Everything the engine evaluated this turn: the summary call's too.
                "evaluated_all_calls": after.evaluated_tokens - before.evaluated_tokens,
                "time_to_first_token": usage["time_to_first_token"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    model = Model(resolve(args.model))
    results = {}
    for kind in ("none", "truncation", "summarization"):
        # A fresh engine per thread: no thread reuses another's cache.
        with Engine(model, EngineSettings(n_ctx=16384, max_running=8, n_seq_max=32)) as engine:
            results[kind] = asyncio.run(session(KVChatCompletion(engine), kind, args.turns, args.answer_tokens))
    model.close()
    print(f"{'turn':>4} | {'none: prompt':>12} {'evaluated':>9} | {'truncation: prompt':>18} {'evaluated':>9} | "
          f"{'summarization: prompt':>21} {'evaluated (all calls)':>21}")
    for none, trunc, summ in zip(results["none"], results["truncation"], results["summarization"], strict=True):
        mark_t = "*" if trunc["reduced"] else " "
        mark_s = "*" if summ["reduced"] else " "
        print(f"{none['turn']:>4} | {none['prompt_tokens']:>12} {none['evaluated_tokens']:>9} | "
              f"{trunc['prompt_tokens']:>17}{mark_t} {trunc['evaluated_tokens']:>9} | "
              f"{summ['prompt_tokens']:>20}{mark_s} {summ['evaluated_all_calls']:>21}")
    totals = {kind: sum(row["evaluated_all_calls"] for row in rows) for kind, rows in results.items()}
    print("* the thread was reduced before this turn; evaluated tokens over all turns:", totals)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "turns": args.turns,
        "answer_tokens": args.answer_tokens,
        "evaluated_total": totals,
        "threads": results,
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
