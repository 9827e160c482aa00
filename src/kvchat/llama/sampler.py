"""`SamplerChain`: a per-request llama.cpp sampler chain."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping
from types import TracebackType

import llama_cpp
import numpy as np

from kvchat.llama.context import Context
from kvchat.llama.model import Model

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""llama.cpp's `llama_token_data`, as a numpy record."""


@functools.cache
def _token_ids(n_vocab: int) -> np.ndarray:
    return np.arange(n_vocab, dtype=np.int32)


class SamplerChain:
    """Turns one logits row into a token, applying the request's sampling options.

    The chain runs, in order: logit bias, penalties, top-k, top-p, min-p,
    temperature, then a seeded random draw; with `temperature == 0` it is greedy
    after bias and penalties. Penalties count only the tokens this chain has
    accepted. :meth:`sample` picks from a batch row and records the pick;
    :meth:`choose` picks from logits the caller has prepared (a grammar's mask
    applied) and :meth:`accept` records the token finally taken. Free it with
    :meth:`close`.
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
    ) -> None:
        n_vocab = model.n_vocab
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        self._candidates = np.empty(n_vocab, dtype=_TOKEN_DATA)
        add = self._add
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
        return int(llama_cpp.llama_sampler_sample(self._open_chain(), context.handle, row))

    def choose(self, logits: np.ndarray) -> int:
        """The chain's pick from `logits` (one per vocabulary token; minus infinity
        for a token that may not be taken), not yet recorded: see :meth:`accept`.
        At least one logit must be finite."""
        chain = self._open_chain()
        candidates = self._candidates
        candidates["id"] = _token_ids(len(candidates))
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(candidates),
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def accept(self, token: int) -> None:
        """Record `token` as taken (the penalties count it)."""
        llama_cpp.llama_sampler_accept(self._open_chain(), token)

    def _open_chain(self) -> llama_cpp.llama_sampler_p:
        if not self._chain:
            raise RuntimeError("sampler chain is closed")
        return self._chain

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
