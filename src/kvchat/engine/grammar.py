"""Constrained decoding on llguidance: `Grammar`, what a request asks its output to
follow, and `GrammarMatcher`, one request's progress through it.

llguidance (the Rust engine behind llama.cpp's, vLLM's and SGLang's structured
output) takes JSON schemas, regular expressions and Lark grammars, and GBNF through
its converter. Its work is bounded by construction: building a grammar stops at
`GRAMMAR_LIMITS`' lexer fuel, grammar size and lexer states, and each step's
token mask at its per-step fuel and Earley items; whatever exceeds them, and a
grammar that no output can satisfy, is an error value, never an abort. So no
request-derived grammar reaches llama.cpp's grammar sampler (which throws a C++
exception, ending the process, on a token it cannot accept), and no request can
hold the engine thread for long.

A `Grammar` is compiled into a matcher on the caller's thread, before the request
is queued (:meth:`Grammar.matcher`): a grammar that does not compile or allows no
first token is an `InvalidRequestError` there. Where the grammar fails only later,
while decoding, the request ends with a `GrammarError` and the engine goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLParserLimits, LLTokenizer, grammar_from

from kvchat.errors import GrammarError, InvalidRequestError
from kvchat.llama import Model
from kvchat.llama.guidance import guidance_tokenizer

__all__ = [
    "GRAMMAR_LIMITS",
    "JSON_LAYOUT",
    "MAX_FORCED_BYTES",
    "MAX_FORCED_TOKENS",
    "MAX_GRAMMAR_TEXT",
    "Grammar",
    "GrammarMatcher",
    "schema_text",
]

GRAMMAR_LIMITS: Mapping[str, int] = {
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 100_000,
    "step_max_items": 20_000,
    "max_lexer_states": 20_000,
    "max_grammar_size": 200_000,
    "max_items_in_row": 2_000,
}
"""llguidance's bounds on one grammar: they bound the lexer and parser work of
building it and of each step's mask, and the memory of its lexer (what that comes
to in time and bytes: docs/reliability.md, "Bounded work")."""

MAX_GRAMMAR_TEXT = 1 << 20
"""Longest grammar or schema text, in characters, that is compiled at all."""

MAX_FORCED_TOKENS = 32
"""Most tokens a grammar forces that one step appends without sampling them."""

MAX_FORCED_BYTES = 256
"""Forced bytes tokenized in one step: llguidance's own forced-token call tokenizes
all the bytes a grammar forces, in time in proportion to them (docs/reliability.md),
so a longer forced run is tokenized a prefix at a time."""

_MAX_REPICKS = 8
"""Choices made again after the grammar refused a masked pick (see `GrammarMatcher.pick`)."""

JSON_LAYOUT: Mapping[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": True,
}
"""How JSON output is laid out: one space after ``,`` and ``:`` and no other blank
space, as Python's `json.dumps` and the chat templates' `tojson` write it (a forced
tool call then reads exactly as the template renders it in the history, and the
grammar forces keys and punctuation as whole runs). `lenient`: keywords llguidance
does not implement (``format`` values it does not know, say) are ignored, as
OpenAI-style servers do, instead of refusing the schema."""


@dataclass(frozen=True)
class Grammar:
    """A grammar for a request's output, in llguidance's form (`definition`).

    Build one with :meth:`json_schema`, :meth:`lark`, :meth:`regex` or
    :meth:`gbnf`; `field` names the request field it came from, for errors.
    Constructors raise `InvalidRequestError(field=field)` for text that is not
    text, too long, or not valid Unicode; whether the grammar compiles is found
    out by :meth:`matcher`.
    """

    definition: str
    field: str = "grammar"

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool, *, field: str = "response_format") -> Grammar:
        """The JSON documents valid under `schema`, laid out as `JSON_LAYOUT` says."""
        text = schema_text(schema, field)
        try:
            definition = LLMatcher.grammar_from_json_schema(text, overrides=dict(JSON_LAYOUT))  # type: ignore[arg-type]
        except ValueError as exc:  # not a JSON object, or nested beyond its parser's limit
            raise InvalidRequestError(f"the JSON schema cannot be used: {exc}", field=field) from None
        return cls(definition, field)

    @classmethod
    def lark(cls, text: str, *, field: str = "grammar") -> Grammar:
        """A grammar in llguidance's Lark syntax (``start`` is the top rule; ``%json {...}``
        embeds a JSON schema; ``<[id]>`` is the token with that id)."""
        return cls(LLMatcher.grammar_from_lark(_checked_text(text, field)), field)

    @classmethod
    def regex(cls, pattern: str, *, field: str = "grammar") -> Grammar:
        """The texts that match `pattern` as a whole (Rust `regex` syntax)."""
        return cls(LLMatcher.grammar_from_regex(_checked_text(pattern, field)), field)

    @classmethod
    def gbnf(cls, text: str, *, field: str = "grammar") -> Grammar:
        """A llama.cpp GBNF grammar (rule ``root``), converted by llguidance."""
        checked = _checked_text(text, field)
        try:
            definition = grammar_from("gbnf", checked)
        except (ValueError, RecursionError, MemoryError) as exc:
            raise InvalidRequestError(f"the grammar does not parse as GBNF: {exc}", field=field) from None
        return cls(definition, field)

    def matcher(self, model: Model) -> GrammarMatcher:
        """Compile the grammar for `model`'s vocabulary: a fresh matcher at the start of
        the output. Raises `InvalidRequestError(field=self.field)` if it does not
        compile within `GRAMMAR_LIMITS` or no output can start it."""
        tokenizer = guidance_tokenizer(model)
        matcher = LLMatcher(tokenizer, self.definition, log_level=0, limits=_limits())
        state = GrammarMatcher(matcher, tokenizer, n_vocab=model.n_vocab, field=self.field)
        if matcher.is_error():
            raise InvalidRequestError(f"the grammar cannot be used: {_message(matcher)}", field=self.field)
        try:
            starts = bool(state.allowed_tokens().any())
        except GrammarError:
            starts = False
        if not starts:
            raise InvalidRequestError("no output can satisfy the grammar", field=self.field)
        return state


class GrammarMatcher:
    """One request's position in its grammar (engine thread only, once queued).

    :meth:`pick` takes the token for the next position: the caller's choice as if
    unconstrained, and only if the grammar refuses it a choice among the tokens
    the grammar allows. A model that follows its grammar mostly picks allowed
    tokens, so most steps never compute a whole mask. Errors are `GrammarError`s;
    after one the matcher stays failed.
    """

    def __init__(self, matcher: LLMatcher, tokenizer: LLTokenizer, *, n_vocab: int, field: str) -> None:
        self._matcher = matcher
        self._tokenizer = tokenizer
        self._n_vocab = n_vocab
        self._ends = frozenset(tokenizer.eos_tokens)
        self.field = field

    @property
    def complete(self) -> bool:
        """True once the grammar allows nothing but the end of the output."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def pick(self, logits: np.ndarray, choose: Callable[[np.ndarray], int]) -> int:
        """The next token, taken: `choose(logits)` if the grammar takes it, else
        `choose` over the logits of the tokens it allows (see `restrict`).

        llguidance's mask may hold a token its parser then refuses (a special token
        whose text the grammar spells out): such a pick is masked too and the choice
        made again, at most `_MAX_REPICKS` times. Where the grammar allows only one
        continuation (a forced run longer than one step appends), its next token is
        taken without choosing: no mask is computed, which for a long literal costs
        far more than a step (docs/reliability.md). Raises `GrammarError`.
        """
        forced = self._forced_tokens(1)
        if forced:
            self.accept(forced[0])
            return forced[0]
        token = choose(logits)
        if self._take(token):
            return token
        allowed = self.restrict(logits)
        for _ in range(_MAX_REPICKS):
            token = choose(allowed)
            if self._take(token):
                return token
            allowed[token] = -np.inf
            if not np.isfinite(allowed).any():
                break
        raise GrammarError("no token can continue the output within its grammar", field=self.field)

    def _take(self, token: int) -> bool:
        """Advance past `token` if the grammar takes it (an end token: if the output may end)."""
        self._raise_if_failed()
        if token in self._ends:
            return self._matcher.is_accepting()
        return self._matcher.try_consume_tokens([token]) == 1

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (without taking it)."""
        if token in self._ends:
            return self._matcher.is_accepting()
        return self._matcher.validate_tokens([token]) == 1

    def allowed_tokens(self) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens that may come next."""
        bits = self._matcher.compute_bitmask()
        self._raise_if_failed()
        return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")[: self._n_vocab].astype(bool)

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar refuses at minus infinity.
        Raises `GrammarError` if it refuses every token."""
        allowed = self.allowed_tokens()
        if not allowed.any():
            raise GrammarError("no token can continue the output within its grammar", field=self.field)
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def accept(self, token: int) -> None:
        """Advance past `token`, which the caller chose; `GrammarError` if the grammar refuses it."""
        if not self._take(token):
            raise GrammarError(f"the output left its grammar: {_message(self._matcher)}", field=self.field)

    def forced(self, limit: int) -> list[int]:
        """Accept and return the tokens the grammar forces next (at most `limit`, and at
        most what `MAX_FORCED_BYTES` tokenize to): they need no sampling step."""
        tokens = self._forced_tokens(min(limit, MAX_FORCED_TOKENS))
        if tokens and not self._matcher.consume_tokens(tokens):
            raise GrammarError(f"the output left its grammar: {_message(self._matcher)}", field=self.field)
        self._raise_if_failed()
        return tokens

    def _forced_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next (not taken)."""
        if limit <= 0 or self._matcher.is_stopped():
            return []
        forced = self._matcher.compute_ff_bytes()
        if not forced:
            return []
        if len(forced) <= MAX_FORCED_BYTES:
            tokens = self._matcher.compute_ff_tokens()[:limit]
        else:
            tokens, _ = self._tokenizer.tokenize_partial(forced[:MAX_FORCED_BYTES])
            tokens = tokens[: self._matcher.validate_tokens(tokens[:limit])]
        self._raise_if_failed()
        return tokens

    def _raise_if_failed(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"the grammar failed: {_message(self._matcher)}", field=self.field)


def _limits() -> LLParserLimits:
    return LLParserLimits(**GRAMMAR_LIMITS, verbose_errors=False)  # type: ignore[arg-type]


def _message(matcher: LLMatcher) -> str:
    """The matcher's error, on one line and of bounded length."""
    message = " ".join(matcher.get_error().replace("<non-verbose/>", "").split())
    return message if len(message) <= 500 else message[:497] + "..."


def _checked_text(text: object, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("the grammar must be non-empty text", field=field)
    if len(text) > MAX_GRAMMAR_TEXT:
        raise InvalidRequestError(
            f"the grammar is {len(text):,} characters long; the limit is {MAX_GRAMMAR_TEXT:,}", field=field
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        raise InvalidRequestError(f"the grammar holds text that is not valid Unicode: {bad}", field=field) from None
    return text


def _plain_mapping(value: object) -> dict[Any, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def schema_text(schema: object, field: str) -> str:
    """`schema` as JSON text (for a Lark grammar's ``%json``), within `MAX_GRAMMAR_TEXT`
    and valid Unicode; `InvalidRequestError(field=field)` otherwise."""
    if not isinstance(schema, (Mapping, bool)):
        raise InvalidRequestError("the JSON schema must be an object", field=field)
    try:
        text = json.dumps(schema, ensure_ascii=False, allow_nan=False, default=_plain_mapping)
    except RecursionError:
        raise InvalidRequestError("the JSON schema nests too deep", field=field) from None
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the JSON schema is not JSON: {exc}", field=field) from None
    return _checked_text(text, field)
