"""`SamplerChain`: a per-request llama.cpp sampler chain."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping
from types import TracebackType

import llama_cpp
import numpy as np

from kvchat.errors import InvalidRequestError
from kvchat.llama.context import Context
from kvchat.llama.grammar import check_grammar
from kvchat.llama.model import Model

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""llama.cpp's `llama_token_data`, as a numpy record."""


@functools.cache
def _token_ids(n_vocab: int) -> np.ndarray:
    return np.arange(n_vocab, dtype=np.int32)


class SamplerChain:
    """Turns one logits row into a token, applying the request's sampling options.

    The chain runs, in order: grammar (tokens that would break it are
    excluded), logit bias, penalties, top-k, top-p, min-p, temperature, then a
    seeded random draw; with `temperature == 0` it is greedy after grammar, bias
    and penalties. Penalties count only the tokens this chain has sampled. Free it
    with :meth:`close`. A grammar that does not parse, or exceeds the bounds of
    `check_grammar` (checked before llama.cpp parses it), raises `InvalidRequestError`.

    The grammar is applied lazily, as llama.cpp's own samplers do: the token is
    first picked without it, and only if the grammar rejects that token are all
    tokens checked and the pick made again. Checking every token of the
    vocabulary against a grammar costs about as much as a decode step of a small
    model (151,936 tokens for Qwen: half its decode speed), and a model following
    a grammar mostly picks allowed tokens. For greedy decoding the result is the
    same token; with a random draw, a rejected pick draws again from the
    constrained distribution.
    """

    def __init__(
        self,
        model: Model,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repeat_penalty: float,
        presence_penalty: float,
        frequency_penalty: float,
        penalty_last_n: int,
        logit_bias: Mapping[int, float],
        seed: int,
        grammar: str | None = None,
    ) -> None:
        if grammar is not None:
            check_grammar(grammar)
        n_vocab = model.n_vocab
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._grammar: llama_cpp.llama_sampler_p | None = None
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        add = self._add
        if grammar is not None:
            self._grammar = llama_cpp.llama_sampler_init_grammar(model.vocab_handle, grammar.encode(), b"root")
            if not self._grammar:
                self._grammar = None
                self.close()
                raise InvalidRequestError("the grammar does not parse (GBNF with a `root` rule)", field="grammar")
            self._candidates = np.empty(n_vocab, dtype=_TOKEN_DATA)
            self._one = np.empty(1, dtype=_TOKEN_DATA)
        if logit_bias:
            entries = (llama_cpp.llama_logit_bias * len(logit_bias))()
            for entry, (token, bias) in zip(entries, logit_bias.items(), strict=True):
                entry.token = token
                entry.bias = bias
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(logit_bias), entries))
        if repeat_penalty != 1.0 or presence_penalty or frequency_penalty:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, penalty_last_n, repeat_penalty, frequency_penalty, presence_penalty
                )
            )
        if temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(temperature))
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, context: Context, row: int) -> int:
        """Sample a token from batch row `row` of the last decode and record it."""
        if not self._chain:
            raise RuntimeError("sampler chain is closed")
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, context.handle, row))
        logits = context.logits(row)
        token = self._pick(logits, grammar=False)
        if not self._grammar_allows(token):
            token = self._pick(logits, grammar=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _pick(self, logits: np.ndarray, *, grammar: bool) -> int:
        """The chain's pick among all tokens (those the grammar allows, with `grammar`),
        not yet recorded."""
        candidates = self._candidates
        candidates["id"] = _token_ids(len(candidates))
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = _as_token_data_array(candidates)
        if grammar:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _grammar_allows(self, token: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, 1.0, 0.0
        array = _as_token_data_array(one)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(np.isfinite(one["logit"][0]))

    def close(self) -> None:
        """Free the chain and its samplers. Safe to call twice."""
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _as_token_data_array(candidates: np.ndarray) -> llama_cpp.llama_token_data_array:
    """A `llama_token_data_array` over `candidates` (kept alive by the caller)."""
    return llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )
