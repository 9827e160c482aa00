"""`Request`: one request's state inside the engine, from submission to finish."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvchat.engine.context_shift import ContextShift
from kvchat.engine.drafting import DraftIndexes
from kvchat.engine.grammar import MAX_FORCED_TOKENS, GrammarMatcher
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.prefix_cache import Node
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.stream import FinishReason, Stream, Usage
from kvchat.engine.text_output import TextOutput
from kvchat.llama import SamplerChain


@dataclass
class SequenceKV:
    """A request's KV sequence: the one record :class:`~kvchat.engine.kv_pool.KVPool`
    keeps of it, and only the pool writes it.

    `seq_id` while admitted; `n_past` tokens held (= the next position);
    `resident_prefix` tokens the latest admission found; `shared_prefix` leading
    positions shared with the tree (or a conversation's resident tokens), not the
    request's own; `locked_node` the tree node locked while it shares its cells;
    `reserved_cells` charged to it (see `Scheduler`).
    """

    seq_id: int | None = None
    n_past: int = 0
    resident_prefix: int = 0
    shared_prefix: int = 0
    locked_node: Node | None = None
    reserved_cells: int = 0


@dataclass(frozen=True)
class RequestSpec:
    """What a request asks for, fixed at submission: its prompt, sampling and limits,
    its tenant (cache namespace), and where its KV may come from (a context shift's
    original, a conversation's pinned sequence)."""

    request_id: int
    prompt: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    reservation_step: int = 256
    """KV cells for generated tokens reserved at a time (`EngineSettings.reservation_step`)."""
    cache_key: str | None = None
    """Prefix-cache namespace: requests with different keys never share cells."""
    shift: ContextShift | None = None
    """Set when the prompt was shortened by a context shift (its KV may come from the original's)."""
    original_cache_key: str | None = None
    """The tenant's own namespace, where the unshifted original may be cached."""
    pinned: PinnedSequence | None = None
    """Set for a conversation's request: it runs in the conversation's own sequence."""
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Request:
    """A submitted request inside the engine, from submission to finish.

    Three owners: `spec`, what was asked (immutable); `kv`, its KV sequence (only
    :class:`~kvchat.engine.kv_pool.KVPool` writes it); and the generation state
    below (tokens, pending tokens, draft, sampler, grammar, counters), which the
    engine's worker thread owns. Only `cancel_requested` is written from other
    threads (a plain bool store, atomic in CPython).
    """

    spec: RequestSpec
    stream: Stream
    kv: SequenceKV = field(default_factory=lambda: SequenceKV())
    """Its KV sequence: written by the pool only (read through the properties below)."""
    pending: list[int] = field(default_factory=list)
    """Tokens to evaluate next: the prompt not yet evaluated, then the last sampled token
    and any tokens its grammar forced after it."""
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    """Prompt tokens taken from the cache (shared cells or restored state) at the first admission."""
    preemptions: int = 0
    """Times the request was preempted: its KV parked, itself queued again to resume."""
    first_token_at: float | None = None
    draft: tuple[int, ...] = ()
    """Tokens proposed to follow the last sampled one, verified in the coming step
    (speculative decoding; see `Speculator`)."""
    draft_tokens: int = 0
    """Drafted tokens verified so far."""
    accepted_draft_tokens: int = 0
    """Drafted tokens that matched what was sampled (they became output)."""
    forced_tokens: int = 0
    """Generated tokens that the grammar forced (appended without sampling)."""
    sampler: SamplerChain | None = None
    grammar: GrammarMatcher | None = None
    """The output's grammar, compiled on the caller's thread (`SamplingParams.grammar`)."""
    draft_indexes: DraftIndexes | None = None
    """The n-gram indexes speculation drafts from, built on the caller's thread."""
    text: TextOutput = field(init=False)
    cancel_requested: bool = False

    def __post_init__(self) -> None:
        self.text = TextOutput(self.sampling.stop)

    # -- what was asked (see `RequestSpec`) -----------------------------------------------------------

    @property
    def request_id(self) -> int:
        return self.spec.request_id

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.spec.prompt

    @property
    def sampling(self) -> SamplingParams:
        return self.spec.sampling

    @property
    def max_new_tokens(self) -> int:
        return self.spec.max_new_tokens

    @property
    def reservation_step(self) -> int:
        return self.spec.reservation_step

    @property
    def cache_key(self) -> str | None:
        return self.spec.cache_key

    @property
    def shift(self) -> ContextShift | None:
        return self.spec.shift

    @property
    def original_cache_key(self) -> str | None:
        return self.spec.original_cache_key

    @property
    def pinned(self) -> PinnedSequence | None:
        return self.spec.pinned

    @property
    def submitted_at(self) -> float:
        return self.spec.submitted_at

    # -- its KV sequence (see `SequenceKV`) ---------------------------------------------------------

    @property
    def seq_id(self) -> int | None:
        """Its KV sequence id while admitted."""
        return self.kv.seq_id

    @property
    def n_past(self) -> int:
        """Tokens of this sequence already in the KV cache (= the next position)."""
        return self.kv.n_past

    @property
    def resident_prefix(self) -> int:
        """Tokens whose KV the latest admission found (shared, restored or shifted)."""
        return self.kv.resident_prefix

    @property
    def shared_prefix(self) -> int:
        """Leading positions whose cells are shared (from the tree, or a conversation's own)."""
        return self.kv.shared_prefix

    @property
    def locked_node(self) -> Node | None:
        """The prefix-cache node locked while this request uses its cells."""
        return self.kv.locked_node

    @property
    def reserved_cells(self) -> int:
        """KV cells charged to this request: those it holds outside the tree, and room
        for what it adds until its next growth (see `Scheduler`)."""
        return self.kv.reserved_cells

    # -- generation ---------------------------------------------------------------------------------

    @property
    def is_decoding(self) -> bool:
        """True while each step evaluates only generated tokens: the last sampled one,
        and those its grammar forced after it."""
        return bool(self.generated) and 0 < len(self.pending) <= min(len(self.generated), 1 + MAX_FORCED_TOKENS)

    @property
    def admission_tokens(self) -> tuple[int, ...]:
        """What an admission makes resident: the prompt, and for a preempted request
        everything sampled so far (the last sampled token is evaluated on resuming)."""
        return self.all_tokens

    @property
    def own_cells(self) -> int:
        """Cells this request holds that no one else is charged for (positions past
        what it shares with the tree or its conversation)."""
        return self.n_past - self.shared_prefix

    def decode_cells(self) -> int:
        """Cells reserved at a time for what the request still generates."""
        return max(1, min(self.reservation_step, self.max_new_tokens - len(self.generated)))

    def note_first_token(self) -> None:
        """Record the time of the first sampled token (once)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def record_token(self, token: int, *, forced: bool = False) -> None:
        """Note a generated token: it is returned and evaluated in the next step (a
        `forced` one after the sampled token it follows)."""
        self.note_first_token()
        self.generated.append(token)
        if forced:
            self.pending.append(token)
            self.forced_tokens += 1
        else:
            self.pending = [token]

    @property
    def all_tokens(self) -> tuple[int, ...]:
        """The prompt and every token generated so far."""
        return self.prompt + tuple(self.generated)

    @property
    def kv_tokens(self) -> tuple[int, ...]:
        """The tokens whose KV this request's sequence holds (positions [0, n_past))."""
        return self.all_tokens[: self.n_past]

    @property
    def evaluated_prompt_tokens(self) -> int:
        """Prompt tokens run through the model so far (not taken from the cache)."""
        return max(0, min(self.n_past, len(self.prompt)) - self.cached_tokens)

    def usage(self, finish_reason: FinishReason, *, completion_tokens: int) -> Usage:
        """The request's usage at its end."""
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        return Usage(
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached_tokens,
            evaluated_tokens=self.evaluated_prompt_tokens,
            completion_tokens=completion_tokens,
            time_to_first_token=ttft,
            finish_reason=finish_reason,
            draft_tokens=self.draft_tokens,
            accepted_draft_tokens=self.accepted_draft_tokens,
            forced_tokens=self.forced_tokens,
        )

    def close_sampler(self) -> None:
        """Free the sampler chain, if any."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
