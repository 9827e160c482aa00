"""`Speculator`: proposes drafts for generating requests, sized to what they are worth.

Each step, a generating request may put a draft (tokens that probably follow its
last one) into the step's batch next to its last token; the engine samples at
every drafted position in order and keeps the draft up to the first token that
differs from what was sampled (see `Engine._verify`). Sampling a token and
accepting the drafted one when they agree is the acceptance rule for a
deterministic draft: the drafted token x is kept with probability p(x), and
otherwise the token sampled is drawn from p without x, renormalised. So the
output has exactly the distribution (at temperature 0: exactly the tokens) of
decoding without drafts.

Where drafts come from, in order of preference (see :mod:`kvchat.engine.drafting`):
the caller's `prediction`, the request's own tokens (prompt lookup), and the
n-gram cache of earlier replies in the request's cache namespace (not for a
request with a `seed`, so that it repeats itself when run alone).

A draft costs rows in the step's `llama_decode` call whether or not it is
accepted, so its length follows a cost model: verifying more rows costs more
per call but far less than a step per token (`call_cost`, fitted to llama.cpp's
CPU backend: it grows with the context, and drops where the call reaches a tile
of `TILE_ROWS`), and each source's recent acceptance rate gives the tokens a
draft of k is expected to yield. A request drafts the k that maximises the step's
tokens per cost, and drafts nothing where no k beats plain decoding (low
acceptance, many sequences in the batch already). A request that runs alone pads
its draft to a whole tile where the tile costs less than the rows it drafted
(after 9,000 cached tokens, any draft of 8 tokens or more).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvchat.engine.drafting import Draft, DraftIndexes, NgramCache, NgramIndex, index_request
from kvchat.engine.request import Request

TILE_ROWS = 64
"""From this many rows up, llama.cpp's CPU flash attention computes a call in 64x64 tiles
(matrix products); below it, row by row, where each row pays for every cached cell it
sees at a far higher price. So a call of 64 rows costs less than one of 63, and after
9,000 cached tokens about as much as one of 8."""


@dataclass(frozen=True)
class KernelCost:
    """Milliseconds of a call of one kernel: ``base + rows * per_row + attended * per_cell``,
    where `attended` is rows x context, the rows padded to whole tiles for the tiled kernel."""

    base_ms: float
    per_row_ms: float
    per_cell_us: float


ONE_ROW = KernelCost(base_ms=34.7, per_row_ms=0.0, per_cell_us=13.27)
ROW_KERNEL = KernelCost(base_ms=34.4, per_row_ms=5.88, per_cell_us=13.04)
TILED_KERNEL = KernelCost(base_ms=62.7, per_row_ms=5.15, per_cell_us=1.02)
"""Fitted by benchmarks/verify_costs.py to calls of 1 to 128 rows after 400 to 9,000
cached tokens, apart for one row (llama.cpp's matrix-vector path), 2 to 63 rows and
64 or more (Qwen 0.5B, 2 CPU cores; within 13% of every timing of the run in
benchmarks/results/verify_costs.json; docs/benchmarks.md, "What a verify call
costs"). Only ratios matter: the speculator compares calls on one machine."""


def attended_rows(rows: int) -> int:
    """Rows whose attention a call of `rows` rows computes: the tiled kernel pads to
    whole tiles (65 rows cost two tiles of attention)."""
    return rows if rows < TILE_ROWS else -(-rows // TILE_ROWS) * TILE_ROWS


def call_cost(rows: int, context: int = 0) -> float:
    """Cost (ms on the measured machine) of a `llama_decode` call of `rows` rows whose
    sequences each see about `context` cached cells."""
    if rows <= 0:
        return 0.0
    kernel = TILED_KERNEL if rows >= TILE_ROWS else ONE_ROW if rows == 1 else ROW_KERNEL
    return kernel.base_ms + rows * kernel.per_row_ms + attended_rows(rows) * context * kernel.per_cell_us / 1000


def padded_rows(rows: int, context: int, room: int) -> int:
    """The rows to send for a call of `rows`: `TILE_ROWS` where the tiled kernel makes
    that cheaper and `room` allows the extra rows, else `rows`."""
    if rows < TILE_ROWS <= rows + room and call_cost(TILE_ROWS, context) < call_cost(rows, context):
        return TILE_ROWS
    return rows


MAX_PRIOR_NAMESPACES = 1024
"""Cache namespaces whose recent acceptance is kept (two small records each, for greedy
and sampling requests); a namespace beyond them starts again from the default prior."""

SOURCES = ("prediction", "lookup", "ngram_cache")
"""Draft sources, in order of preference."""
PADDING = "padding"
"""The source of a draft that is padding alone (`Draft.padding`: no source proposed it)."""
_SHARED_PRIOR_SOURCES = ("lookup", "ngram_cache")
"""Sources whose acceptance over recent requests is a new request's prior. A caller's
prediction is about its own request alone: it starts from `PREDICTION_PRIOR`, so one
caller's poor predictions never pause another's."""
PREDICTION_PRIOR = (3.6, 0.4)
"""A caller's prediction starts at 9 in 10 (accepted, rejected), against 17 in 20 for
the engine's own sources: it is the caller's expectation of this very reply, sent
where most of the reply is known. A reply that repeats its prediction then
reaches the longest draft in fewer steps; a wrong prediction costs one longer
rejected draft."""

_DECAY = 0.8  # weight of the past in a source's acceptance estimate
_RECOVERY = 0.995
"""Per step without a source's draft, how much of its failures is forgotten, so a paused
source is tried again (after some 200 steps). Each try costs a long call, so tries are
rare: with more frequent tries, replies whose drafts seldom hold (fresh chats at the
default temperature) lost a good part of their decode speed to them (docs/benchmarks.md,
"On the default path")."""


def expected_tokens(acceptance: float, length: int) -> float:
    """Tokens a step yields for a request that drafts `length` tokens, each accepted
    with probability `acceptance` as long as the ones before it were (the token
    sampled after the last accepted one always counts)."""
    return sum(acceptance**i for i in range(length + 1))


@dataclass
class Acceptance:
    """A source's recent acceptance, as the probability that a drafted token is
    accepted given that the ones before it were: accepted tokens over accepted
    tokens plus rejections, both decayed, from a prior of 17 in 20 (for a request's
    lookup and n-gram cache drafts: the source's recent rate over earlier requests;
    for its prediction: `PREDICTION_PRIOR`; see `Speculator`)."""

    accepted: float = 3.4
    rejected: float = 0.6
    """The prior, 0.85: a fresh engine tries its sources (a draft of a few tokens pays
    at this rate after a short context) and learns from the outcome."""

    @property
    def rate(self) -> float:
        """The current estimate."""
        return self.accepted / (self.accepted + self.rejected)

    def update(self, drafted: int, accepted: int) -> None:
        """Learn from one verified draft."""
        self.accepted = _DECAY * self.accepted + accepted
        self.rejected = _DECAY * self.rejected + (1 if accepted < drafted else 0)

    def rest(self) -> None:
        """A step without this source's draft: forget failures a little."""
        self.rejected *= _RECOVERY

    def as_prior(self, weight: float = 4.0) -> Acceptance:
        """A fresh estimate with this one's rate and the given weight (for a new request)."""
        scale = weight / (self.accepted + self.rejected)
        return Acceptance(self.accepted * scale, self.rejected * scale)


@dataclass
class _RequestDrafts:
    """One request's drafting state."""

    indexes: DraftIndexes
    cursors: dict[str, int] = field(default_factory=dict)
    """Per followed source: where in its tokens the last accepted draft ended."""
    acceptance: dict[str, Acceptance] = field(default_factory=dict)
    in_flight: Draft | None = None

    def rate(self, source: str) -> Acceptance:
        return self.acceptance[source]


class Speculator:
    """Drafts for an engine's generating requests (worker thread only).

    :meth:`propose` sets `Request.draft` for the coming step; :meth:`verified`
    learns from the outcome; :meth:`finished` adds a finished request's output
    to the n-gram cache and drops its state.
    """

    def __init__(self, *, max_draft_tokens: int, ngram_cache_entries: int) -> None:
        self.max_draft_tokens = max_draft_tokens
        self.ngram_cache = NgramCache(ngram_cache_entries)
        self._states: dict[Request, _RequestDrafts] = {}
        self._recent: OrderedDict[tuple[str | None, bool], dict[str, Acceptance]] = OrderedDict()
        """The engine's own sources' acceptance over recent requests, per cache namespace
        (a tenant's traffic never changes another's drafting) and apart for greedy and
        sampling requests (a drafted token is kept far less often when the token is drawn):
        a new request's prior. At most `MAX_PRIOR_NAMESPACES` namespaces, least recently
        used out first."""

    def propose(self, running: Sequence[Request], *, capacity: int, call_rows: int) -> None:
        """Choose each generating request's draft for the coming step, and one for a
        request that runs alone and whose prompt ends in this step: its draft follows
        the prompt's last token in the rows of a tile the prompt's last rows pay for
        anyway (they cost more than a tile), so the reply's first tokens can come with
        the prompt at no cost to its first token."""
        decoding = [r for r in running if r.is_decoding]
        if len(running) == 1 and call_rows >= TILE_ROWS and _ends_prompt(running[0], capacity):
            decoding = [running[0]]
        if not decoding:
            return
        rows = min(capacity, sum(len(r.pending) for r in running))
        gained = float(len(decoding))  # tokens the step yields without drafts
        drafted_sources: set[tuple[str | None, bool, str]] = set()
        for request in decoding:
            room = min(
                self.max_draft_tokens,
                call_rows - len(request.pending),
                capacity - rows,
                request.reserved_cells - request.own_cells - len(request.pending),
                request.max_new_tokens - len(request.generated),  # the last one may end it
            )
            # Padding needs the whole step in one call (the planner cuts a step of
            # several sequences into calls below TILE_ROWS).
            draft = self._best_draft(request, room, rows, gained, pad=call_rows >= TILE_ROWS) if room >= 1 else None
            state = self._state(request)
            state.in_flight = draft
            request.draft = draft.tokens if draft is not None else ()
            for source, acceptance in state.acceptance.items():
                if draft is None or source != draft.source:
                    acceptance.rest()
            if draft is not None:
                rows += len(draft.tokens)
                if len(draft.tokens) > draft.padding:
                    proposed = len(draft.tokens) - draft.padding
                    gained += expected_tokens(state.rate(draft.source).rate, proposed) - 1
                    drafted_sources.add((_namespace(request), _is_greedy(request), draft.source))
        for namespace, greedy in {(_namespace(r), _is_greedy(r)) for r in decoding}:
            for source, recent in self._recent_for(namespace, greedy).items():
                if (namespace, greedy, source) not in drafted_sources:
                    recent.rest()  # so that a source paused for every new request is tried again

    def verified(self, request: Request, drafted: int, accepted: int) -> tuple[int, int]:
        """Learn that `accepted` of the `drafted` tokens verified for `request` were accepted.

        Returns the drafted and accepted tokens that came from the draft's source (the
        padding after them is no one's proposal: it counts in neither).
        """
        state = self._states.get(request)
        if state is None or state.in_flight is None:
            return drafted, accepted
        draft, state.in_flight = state.in_flight, None
        drafted = min(drafted, len(draft.tokens) - draft.padding)  # (the padding comes last)
        accepted = min(accepted, drafted)
        if not drafted:  # padding alone: nothing was proposed
            return 0, 0
        state.rate(draft.source).update(drafted, accepted)
        recent = self._recent_for(_namespace(request), _is_greedy(request)).get(draft.source)
        if recent is not None:
            recent.update(drafted, accepted)
        if draft.source in ("prediction", "lookup"):
            state.cursors[draft.source] = draft.start + accepted
        return drafted, accepted

    def finished(self, request: Request, *, keep: bool) -> None:
        """Forget `request`; if `keep`, remember its output for later requests of its namespace."""
        self._states.pop(request, None)
        if keep and request.generated:
            self.ngram_cache.add(_namespace(request), request.generated)

    def _recent_for(self, namespace: str | None, greedy: bool) -> dict[str, Acceptance]:
        """The recent acceptance of the engine's own sources in `namespace` (fresh priors
        for a namespace not seen lately)."""
        key = (namespace, greedy)
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = {source: Acceptance() for source in _SHARED_PRIOR_SOURCES}
            while len(self._recent) > MAX_PRIOR_NAMESPACES:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        return recent

    # -- drafting --------------------------------------------------------------------------------

    def _state(self, request: Request) -> _RequestDrafts:
        state = self._states.get(request)
        if state is None:
            indexes = request.draft_indexes
            if indexes is None:  # submitted without them (the engine indexes every request it queues)
                indexes = index_request(request.prompt, request.sampling.prediction)
            priors = {source: Acceptance() for source in SOURCES}
            priors["prediction"] = Acceptance(*PREDICTION_PRIOR)
            recent = self._recent_for(_namespace(request), _is_greedy(request))
            priors.update({source: recent[source].as_prior() for source in _SHARED_PRIOR_SOURCES})
            state = self._states[request] = _RequestDrafts(indexes, acceptance=priors)
        return state

    def _best_draft(self, request: Request, room: int, rows: int, gained: float, *, pad: bool) -> Draft | None:
        """The first source's draft, cut to the length that pays best (and padded where
        that makes the call cheaper, if `pad`), if any pays."""
        state = self._state(request)
        context = request.n_past
        plain_rows = padded_rows(rows, context, room) if pad else rows
        plain_cost = call_cost(plain_rows, context)
        plain = gained / plain_cost
        # After a prompt, the reply's first token waits for the whole call: a draft
        # there may only take rows that cost nothing more (the padding's).
        most = plain_cost if not request.generated else float("inf")
        for draft in self._candidates(request, state, room):
            acceptance = state.rate(draft.source).rate
            best_length, best_rows, best_value = 0, rows, plain
            for k in range(1, len(draft.tokens) + 1):
                sent = padded_rows(rows + k, context, room - k) if pad else rows + k
                cost = call_cost(sent, context)
                if cost > most:
                    break
                value = (gained - 1 + expected_tokens(acceptance, k)) / cost
                if value > best_value:
                    best_length, best_rows, best_value = k, sent, value
            if best_length:
                tokens = draft.tokens[:best_length]
                padding = best_rows - rows - best_length
                return Draft(tokens + tokens[-1:] * padding, draft.source, draft.start, padding)
        if plain_rows > rows:  # no draft pays, but the rows cost less as a tile
            padding = plain_rows - rows
            return Draft(tuple(request.pending[-1:]) * padding, PADDING, padding=padding)
        return None

    def _candidates(self, request: Request, state: _RequestDrafts, room: int) -> list[Draft]:
        generated = request.generated
        drafts: list[Draft] = []
        prediction = state.indexes.prediction
        if prediction is not None:
            if generated:
                start, tokens = prediction.continuation(
                    generated[-prediction.max_n :], room, after=state.cursors.get("prediction", 0)
                )
            else:  # after the prompt: the reply is expected to start as the prediction does
                start, tokens = 0, prediction.tokens[:room]
            if tokens:
                drafts.append(Draft(tuple(tokens), "prediction", start))
        lookup = self._lookup_index(request, state)
        context = request.all_tokens[-lookup.max_n :]
        start, tokens = lookup.continuation(context, room, after=state.cursors.get("lookup", len(lookup)))
        if tokens:
            drafts.append(Draft(tuple(tokens), "lookup", start))
        if request.sampling.seed is None:
            # A seeded request drafts only from itself: run alone, it then repeats
            # itself exactly (the cache's drafts would change its batch shapes, and
            # llama.cpp's logits move slightly with them).
            cached = self.ngram_cache.continuation(_namespace(request), context, room)
            if cached:
                drafts.append(Draft(tuple(cached), "ngram_cache"))
        return drafts

    @staticmethod
    def _lookup_index(request: Request, state: _RequestDrafts) -> NgramIndex:
        """The request's lookup index, extended by the tokens generated since the last step."""
        indexes = state.indexes
        tokens = request.all_tokens
        indexes.lookup.extend(tokens[indexes.lookup_indexed :])
        indexes.lookup_indexed = len(tokens)
        return indexes.lookup


def _ends_prompt(request: Request, capacity: int) -> bool:
    """True if `request` has generated nothing yet and its prompt's rest fits in one step
    with room for a draft."""
    return not request.generated and 0 < len(request.pending) < capacity


def _is_greedy(request: Request) -> bool:
    return request.sampling.temperature == 0


def _namespace(request: Request) -> str | None:
    """The tenant's own cache namespace (a shifted request's original one)."""
    return request.original_cache_key if request.shift is not None else request.cache_key
