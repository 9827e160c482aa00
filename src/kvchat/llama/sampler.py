"""`SamplerChain`: a per-request llama.cpp sampler chain."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import llama_cpp

from kvchat.errors import InvalidRequestError
from kvchat.llama.context import Context
from kvchat.llama.grammar import check_grammar
from kvchat.llama.model import Model


class SamplerChain:
    """Turns one logits row into a token, applying the request's sampling options.

    The chain runs, in order: grammar (tokens that would break it are
    excluded), logit bias, penalties, top-k, top-p, min-p, temperature, then a
    seeded random draw; with `temperature == 0` it is greedy after grammar, bias
    and penalties. Penalties count only the tokens this chain has sampled. Free it
    with :meth:`close`. A grammar that does not parse, or exceeds the bounds of
    `check_grammar` (checked before llama.cpp parses it), raises `InvalidRequestError`.
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
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        add = self._add
        if grammar is not None:
            grammar_sampler = llama_cpp.llama_sampler_init_grammar(model.vocab_handle, grammar.encode(), b"root")
            if not grammar_sampler:
                self.close()
                raise InvalidRequestError("the grammar does not parse (GBNF with a `root` rule)", field="grammar")
            add(grammar_sampler)
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
        return int(llama_cpp.llama_sampler_sample(self._chain, context.handle, row))

    def close(self) -> None:
        """Free the chain and its samplers. Safe to call twice."""
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
