"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kvchat.engine.grammar import Grammar
from kvchat.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
"""Most stop strings one request may give."""

MAX_STOP_LENGTH = 1_000
"""Longest stop string, in characters. Each stop string is matched by a KMP automaton
that reads each character once, amortized; one character can fall back along the
whole partial match, so a token's worst case is this length times `MAX_STOP_STRINGS`
steps (figures: docs/reliability.md, "The limits")."""


MAX_PREDICTION_TOKENS = 32_768
"""Longest `prediction`, in tokens (its lookup index costs memory per token)."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Options of one generation request. Invalid values raise `InvalidRequestError`.

    Defaults follow llama.cpp's server (temperature 0.8, top-k 40, top-p 0.95,
    min-p 0.05) except penalties, which are off unless asked for, as in OpenAI's
    API. `temperature=0` is greedy decoding. `seed=None` draws a random seed.
    `max_tokens=None` generates until the end of the sequence's context.
    `stop` strings end the output before the stop string (it is not returned);
    `stop_token_ids` end it on those tokens, in addition to the model's own
    end-of-generation tokens. Penalties see only the generated tokens.
    `grammar` constrains the output: a :class:`Grammar` (JSON schema, regex, Lark or
    GBNF, through llguidance), or GBNF text with a `root` rule, converted with
    :meth:`Grammar.gbnf`. Tokens the grammar forces are appended without sampling.
    `prediction`: token ids of the output the caller expects (OpenAI's predicted
    outputs); with speculation on, stretches of it are verified as drafts, so an
    answer that repeats it comes faster. It never changes what is generated.
    """

    max_tokens: int | None = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    grammar: Grammar | str | None = None
    prediction: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from callers, store immutable values.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "prediction", tuple(self.prediction))
        object.__setattr__(self, "logit_bias", MappingProxyType(dict(self.logit_bias)))
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "must be a positive integer or None",
        )
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        _check(_finite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat_penalty", "must be > 0")
        _check(
            _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            "must be in [-2, 2]",
        )
        _check(
            _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            "must be in [-2, 2]",
        )
        _check(
            isinstance(self.penalty_last_n, int) and self.penalty_last_n >= -1,
            "penalty_last_n",
            "must be >= -1 (-1 = whole output)",
        )
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer or None")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty text")
        _check(
            all(len(s) <= MAX_STOP_LENGTH for s in self.stop),
            "stop",
            f"strings must be at most {MAX_STOP_LENGTH:,} characters long",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0"
        )
        _check(all(_is_int(t) and t >= 0 for t in self.prediction), "prediction", "must be token ids >= 0")
        _check(
            len(self.prediction) <= MAX_PREDICTION_TOKENS,
            "prediction",
            f"must be at most {MAX_PREDICTION_TOKENS:,} tokens",
        )
        _check(
            all(isinstance(t, int) and t >= 0 and _finite(b) for t, b in self.logit_bias.items()),
            "logit_bias",
            "keys must be token ids >= 0 and values finite numbers",
        )
        if isinstance(self.grammar, str):
            object.__setattr__(self, "grammar", Grammar.gbnf(self.grammar))
        _check(self.grammar is None or isinstance(self.grammar, Grammar), "grammar", "must be a Grammar, GBNF or None")

    @property
    def constraint(self) -> Grammar | None:
        """`grammar` as a :class:`Grammar` (GBNF text was converted when these were made)."""
        return self.grammar if isinstance(self.grammar, Grammar) else None

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no bias or penalty: the argmax (among the tokens a grammar
        allows) is the answer, and no sampler chain is needed."""
        return (
            self.temperature == 0
            and not self.logit_bias
            and self.repeat_penalty == 1.0
            and not self.presence_penalty
            and not self.frequency_penalty
        )

    def check_token_ids(self, n_vocab: int) -> None:
        """Raise `InvalidRequestError` if a token id here is outside the vocabulary."""
        _check(all(t < n_vocab for t in self.stop_token_ids), "stop_token_ids", f"token ids must be < {n_vocab}")
        _check(all(t < n_vocab for t in self.logit_bias), "logit_bias", f"token ids must be < {n_vocab}")
        _check(all(t < n_vocab for t in self.prediction), "prediction", f"token ids must be < {n_vocab}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{field_name} {message}", field=field_name)


GREEDY = SamplingParams(temperature=0.0)
"""Greedy decoding with the default `max_tokens`."""
