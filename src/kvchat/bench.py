"""The multi-turn chat benchmark behind ``kvchat bench``: prefix cache on and off, one run.

K users chat for N turns through :func:`kvchat.chat.complete.complete`, each
call re-sending the whole history (as stateless clients do); each turn, the
users' requests are submitted together and batched. The same conversation runs
on two engines over one loaded model: one with the prefix cache, one without.
Replies are greedy and of fixed length, so both engines see the same histories.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvchat.chat.complete import complete
from kvchat.engine import Engine, EngineSettings, SamplingParams
from kvchat.llama import Model

_WORDS = (
    "river mountain library engine garden signal harbor lantern meadow circuit compass orchard "
    "glacier workshop canyon beacon archive valley market bridge forest planet kettle ladder "
    "puzzle violin desert island tunnel window"
).split()
SYSTEM = "You are a helpful assistant. Answer briefly."


def user_message(user: int, turn: int, words: int = 48) -> str:
    """A deterministic user message of about `words` words, different per user and turn."""
    rng = random.Random(user * 1_000 + turn)
    return f"User {user}, question {turn}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "?"


@dataclass
class TurnResult:
    """One turn of every user, on one engine."""

    turn: int
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def median_ttft(self) -> float:
        return statistics.median(self.ttft)


def run_turns(
    engine: Engine, users: int, turns: int, max_tokens: int, progress: Callable[[str], None] | None = None
) -> list[TurnResult]:
    """Chat `turns` turns with `users` users on `engine`; one result per turn."""
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(users)]
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    results = []
    for turn in range(turns):
        for user, history in enumerate(histories):
            history.append({"role": "user", "content": user_message(user, turn)})
        started = time.perf_counter()
        streams = [complete(engine, history, sampling=sampling) for history in histories]
        replies = [stream.collect() for stream in streams]
        result = TurnResult(turn + 1, seconds=time.perf_counter() - started)
        for history, reply in zip(histories, replies, strict=True):
            history.append(reply.to_message())
            usage = reply.usage
            result.ttft.append(usage.time_to_first_token or 0.0)
            result.prompt_tokens += usage.prompt_tokens
            result.cached_tokens += usage.cached_tokens
            result.evaluated_tokens += usage.evaluated_tokens
            result.completion_tokens += usage.completion_tokens
        results.append(result)
        if progress:
            progress(f"turn {turn + 1}/{turns}: TTFT {result.median_ttft:.3f} s")
    return results


def run_benchmark(
    model: Model, *, users: int, turns: int, max_tokens: int, n_ctx: int, progress: Callable[[str], None] | None = None
) -> dict[str, list[TurnResult]]:
    """The same chat with the prefix cache on and off: ``{"on": [...], "off": [...]}``."""
    results = {}
    for mode in ("on", "off"):
        settings = EngineSettings(
            n_ctx=n_ctx, max_running=max(users, 1), n_seq_max=max(2 * users, 2), prefix_cache=mode == "on"
        )
        with Engine(model, settings) as engine:
            say = (lambda text, mode=mode: progress(f"cache {mode}: {text}")) if progress else None
            results[mode] = run_turns(engine, users, turns, max_tokens, say)
    return results


def plot_ttft(results: dict[str, list[TurnResult]], path: str, title: str) -> None:
    """Save a chart of the median time to first token per turn, cache on and off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for mode, label in (("off", "prefix cache off"), ("on", "prefix cache on (kvchat)")):
        turns = results[mode]
        axes.plot([t.turn for t in turns], [t.median_ttft for t in turns], marker="o", label=label)
    axes.set_xlabel("turn")
    axes.set_ylabel("time to first token (s)")
    axes.set_title(title)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
