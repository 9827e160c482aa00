"""Fitting a prompt into the context: the overflow policies of :func:`kvchat.chat.complete`.

``"error"`` refuses a prompt that, with the reply's `max_tokens`, exceeds the
context; ``"truncate_oldest"`` drops the oldest turns; ``"shift"`` drops the
oldest half of the tokens after the kept ones, as a :class:`ContextShift`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from kvchat.engine.context_shift import ContextShift
from kvchat.engine.radix import common_prefix_length
from kvchat.errors import ContextOverflowError, InvalidRequestError

OverflowPolicy = Literal["error", "truncate_oldest", "shift"]


class PromptEncoder(Protocol):
    """What fitting needs of a :class:`~kvchat.chat.tokenizer.ChatTokenizer`."""

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        namespace: str | None = None,
    ) -> list[int]: ...


def _nothing() -> None:
    return None


def fit_prompt(
    tokenizer: PromptEncoder,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    limit: int,
    need: int,
    overflow: OverflowPolicy,
    n_keep: int | None = None,
    namespace: str | None = None,
    before_render: Callable[[], None] = _nothing,
) -> tuple[list[int], ContextShift | None]:
    """The prompt's tokens, after applying the `overflow` policy so that they and
    `need` reply tokens fit in `limit`, and the shift that builds them, if any.

    ``"truncate_oldest"`` keeps the fewest dropped turns that fit (see
    :func:`turn_starts` for what a turn is). Rather than render the conversation
    once per dropped turn (quadratic in its length), it renders the whole
    conversation, then the one that keeps only the last turn, then bisects the
    number of dropped turns in between: at most ``log2(turns) + 2`` renders.
    That gives the same prompt as dropping one turn at a time, since dropping
    more turns never makes the prompt longer (a template renders each message
    on its own). `before_render` is called before every render (it may raise to
    stop the work).

    Raises `InvalidRequestError` (field ``overflow``) for an unknown policy and
    `ContextOverflowError` when the prompt cannot be made to fit.
    """
    if overflow not in ("error", "truncate_oldest", "shift"):
        raise InvalidRequestError(f"unknown overflow policy {overflow!r}", field="overflow")
    messages = list(messages)

    def encode(kept: list[Mapping[str, Any]]) -> list[int]:
        before_render()
        return tokenizer.encode(kept, tools=tools, namespace=namespace)

    tokens = encode(messages)
    if len(tokens) + need <= limit:
        return tokens, None
    if overflow == "shift":
        keep = system_prefix_length(tokenizer, messages, tokens, namespace) if n_keep is None else n_keep
        shift = ContextShift.to_fit(tuple(tokens), keep, limit - need)
        return list(shift.prompt), shift
    starts = turn_starts(messages) if overflow == "truncate_oldest" else []
    if len(starts) < 2:  # nothing may be dropped
        raise ContextOverflowError(prompt_tokens=len(tokens), max_tokens=need, context_limit=limit)

    def dropping(turns: int) -> list[Mapping[str, Any]]:
        return messages[: starts[0]] + messages[starts[turns] :]

    fits, fitted = len(starts) - 1, encode(dropping(len(starts) - 1))  # only the last turn left
    if len(fitted) + need > limit:
        raise ContextOverflowError(prompt_tokens=len(fitted), max_tokens=need, context_limit=limit)
    too_few = 0  # dropping this many turns does not fit; dropping `fits` does
    while fits - too_few > 1:
        middle = (too_few + fits) // 2
        candidate = encode(dropping(middle))
        if len(candidate) + need <= limit:
            fits, fitted = middle, candidate
        else:
            too_few = middle
    return fitted, None


def turn_starts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Where the kept part of `messages` may begin, oldest first: dropping ``k`` turns
    keeps ``messages[:starts[0]] + messages[starts[k]:]``.

    ``starts[0]`` is the first message after the leading system (and developer)
    messages, which are always kept. A turn runs from there up to the next user
    message: a message and the replies, tool calls and tool results (and any
    system message) that follow it, so a tool call is never kept without its
    results or the other way round. The last turn, the one being answered, is
    never dropped. Empty if there is no message but system ones.
    """
    first = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), None)
    if first is None:
        return []
    return [first, *(i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user")]


def system_prefix_length(
    tokenizer: PromptEncoder, messages: list[Mapping[str, Any]], tokens: list[int], namespace: str | None
) -> int:
    """Tokens at the start of the prompt `tokens` that render the leading system messages."""
    n = 0
    while n < len(messages) and messages[n].get("role") in ("system", "developer"):
        n += 1
    if n == 0:
        return 0
    system = tokenizer.encode(messages[:n], add_generation_prompt=False, namespace=namespace)
    return common_prefix_length(system, tokens)
