"""`EngineCore`: one engine step (schedule, run, verify and emit), with no thread of its own.

The core owns the worker's state: the KV pool, the scheduler, the speculator and
the step planner. :meth:`EngineCore.step` admits waiting requests, grows
reservations, proposes drafts, evaluates the step's batch in one or more calls
through the :class:`~kvchat.engine.backend.Runner`, samples (verifying drafts)
and emits, and ends the requests that are done. :class:`~kvchat.engine.Engine`
runs it on its worker thread; tests drive it directly on a fake backend.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvchat.engine.admission import Admission
from kvchat.engine.backend import KVMemory, Runner
from kvchat.engine.kv_pool import KVPool
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.prefix_cache import PrefixCache
from kvchat.engine.request import Request
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.scheduler import Scheduler
from kvchat.engine.settings import EngineSettings
from kvchat.engine.speculation import Speculator
from kvchat.engine.state_store import StateStore
from kvchat.engine.stats import StatsBoard, StepTiming
from kvchat.engine.step_planner import ScheduledRow, StepPlanner
from kvchat.engine.stream import Chunk, FinishReason
from kvchat.engine.verification import Verdict, verify_draft
from kvchat.errors import BackendError, DecodeError, GrammarError
from kvchat.llama import Batch, Model, SamplerChain

logger = logging.getLogger("kvchat.engine")


@dataclass(frozen=True)
class _Ending:
    """Why a request ends, and at which of the step's emitted tokens."""

    reason: FinishReason
    index: int


class EngineCore:
    """The engine's worker state and its step (worker thread only).

    `model` gives the vocabulary (end-of-generation tokens, token bytes, its
    size); `memory` and `runner` are the backend (see :mod:`kvchat.engine.backend`).
    """

    def __init__(self, model: Model, settings: EngineSettings, memory: KVMemory, runner: Runner) -> None:
        self.model = model
        self.settings = settings
        self._runner = runner
        self.pool = KVPool(memory, cache=self._new_prefix_cache(), store=self._new_state_store(memory))
        self.pinned = PinnedSequences(self.pool)
        admission = Admission(self.pool, compact=settings.compact_pool)
        self.scheduler = Scheduler(self.pool, admission, self.pinned, max_running=settings.max_running)
        self.speculator = self._new_speculator()
        self.stats = StatsBoard()
        self._planner = StepPlanner(interleaved_call_rows=settings.interleaved_call_rows)
        self._batch = Batch(runner.n_batch)
        self.publish_stats()

    def _new_prefix_cache(self) -> PrefixCache | None:
        if not self.settings.prefix_cache:
            return None
        if self.model.is_recurrent or self.model.is_hybrid:
            logger.info(
                "prefix cache disabled: %s keeps recurrent state, which cannot be cut at a token boundary",
                self.model.description,
            )
            return None
        return PrefixCache()

    def _new_speculator(self) -> Speculator | None:
        s = self.settings
        if s.speculation == "off":
            return None
        if self.model.is_recurrent or self.model.is_hybrid:
            logger.info("speculation off: %s cannot drop rejected draft tokens from its state", self.model.description)
            return None
        return Speculator(max_draft_tokens=s.max_draft_tokens, ngram_cache_entries=s.ngram_cache_entries)

    def _new_state_store(self, memory: KVMemory) -> StateStore | None:
        s = self.settings
        if not s.prefix_cache or (s.cache_ram_bytes == 0 and s.cache_dir is None):
            return None
        return StateStore(
            ram_budget_bytes=s.cache_ram_bytes,
            disk_dir=s.cache_dir,
            disk_budget_bytes=s.cache_disk_bytes,
            layout_key="" if s.cache_dir is None else memory.layout_key(),
        )

    @property
    def busy(self) -> bool:
        """True while a request runs or waits."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    def add(self, request: Request) -> None:
        """Queue a submitted request."""
        self.scheduler.add(request)

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> None:
        """End cancelled requests, admit, reserve, then run the step's calls and emit."""
        started, sampling_cpu = time.perf_counter(), 0.0
        self._reap_cancelled()
        admitted = self.scheduler.admit()
        for request in admitted:
            if request.sampler is None and not request.sampling.is_plain_greedy:  # (a resumed one keeps its own)
                request.sampler = self._new_sampler(request.sampling)
        for request in self.scheduler.reserve_step():
            logger.warning("request %d ends: the KV pool has no room for more tokens", request.request_id)
            self.finish(request, "length")
        if admitted:
            self.publish_stats()
        decoded = False
        running = self.scheduler.running
        if self.speculator is not None:
            self.speculator.propose(
                running,
                capacity=self._batch.capacity,
                call_rows=self._planner.call_rows(len(running), self._batch.capacity),
            )
        for rows in self._planner.calls(list(running), self._batch, self.pool):
            try:
                self._runner.decode(self._batch)
            except DecodeError as exc:
                logger.error("%s; failing the %d running requests", exc, len(running))
                self.fail_running(exc)
                return
            decoded = True
            sampling_started = time.thread_time()
            for scheduled in rows:
                self._sample(scheduled)
            sampling_cpu += time.thread_time() - sampling_started
        if decoded:
            self.stats.counters.steps += 1
            self.stats.record_step(StepTiming(started, time.perf_counter() - started, sampling_cpu))
        self.publish_stats()

    def _new_sampler(self, sampling: SamplingParams) -> SamplerChain:
        return SamplerChain(
            self.model,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            penalty_last_n=sampling.penalty_last_n,
            logit_bias=sampling.logit_bias,
            seed=sampling.seed if sampling.seed is not None else random.getrandbits(32),
        )

    def _sample(self, scheduled: ScheduledRow) -> None:
        """Sample (verifying the draft, if any), emit, and end the request if it is done."""
        request = scheduled.request
        try:
            if scheduled.draft:
                verdict = verify_draft(lambda row: self._pick(request, row), scheduled.row, scheduled.draft)
                self._learn(request, verdict)
                # The cells of drafted tokens that were not accepted are not the request's.
                self.pool.drop_tail(request, verdict.rejected)
                kv_length = request.n_past - verdict.accepted
                ending = self._emit(request, verdict.tokens)
                if ending is not None:
                    # Keep the KV decoding without drafts would hold at this end: the
                    # tokens before the one that ended it (drafted ones after are not its own).
                    self.pool.truncate(request, kv_length + verdict.cells_kept_if_ending_at(ending.index))
            else:
                ending = self._emit(request, (self._pick(request, scheduled.row),))
            if ending is not None:
                self.finish(request, ending.reason)
        except GrammarError as exc:
            self._fail(request, exc)
        except Exception as exc:
            logger.exception("request %d failed while sampling", request.request_id)
            self._fail(request, BackendError(f"sampling failed: {exc!r}"))

    def _learn(self, request: Request, verdict: Verdict) -> None:
        drafted, accepted = verdict.drafted, verdict.accepted
        if self.speculator is not None:  # (it leaves out a draft's padding)
            drafted, accepted = self.speculator.verified(request, drafted, accepted)
        request.draft_tokens += drafted
        request.accepted_draft_tokens += accepted

    def _pick(self, request: Request, row: int) -> int:
        """Sample the request's next token from batch row `row` (its sampler and its
        grammar record it).

        With a grammar, the token is picked as if unconstrained first; only if the
        grammar refuses it is it picked again among the tokens the grammar allows
        (see `GrammarMatcher.pick`). For a random draw this is still a draw from the
        constrained distribution: a token x the grammar allows comes with p(x) on the
        first try plus (1 - Z) p(x) / Z on the second, Z being the allowed mass.
        """
        sampler, grammar = request.sampler, request.grammar
        if grammar is None:
            if sampler is None:
                return int(np.argmax(self._runner.logits(row)))
            return self._runner.sample(sampler, row)
        token = grammar.pick(self._runner.logits(row), _argmax if sampler is None else sampler.choose)
        if sampler is not None:
            sampler.accept(token)
        return token

    def _emit(self, request: Request, tokens: Sequence[int]) -> _Ending | None:
        """Emit one step's sampled tokens, and the tokens the request's grammar forces
        after them, as one chunk, up to the first that ends the request; say which
        sampled token that was (the last, if a forced one or the grammar's end did)."""
        texts: list[str] = []
        ending: _Ending | None = None
        for i, token in enumerate(tokens):
            if token in request.sampling.stop_token_ids or self.model.is_end_of_generation(token):
                request.note_first_token()
                ending = _Ending("stop", i)
                break
            reason = self._take(request, token, texts)
            if reason is not None:
                ending = _Ending(reason, i)
                break
        grammar = request.grammar
        if ending is None and grammar is not None:
            last = len(tokens) - 1
            if grammar.complete:
                ending = _Ending("stop", last)  # nothing but the end may follow: no step for it
            else:
                # Forced tokens are evaluated as rows of the next call. On a CPU each row
                # costs about a quarter of a decode step, and every request in that call
                # waits for it (like a prompt being evaluated; docs/benchmarks.md,
                # "Structured output on llguidance").
                # So they are appended only while the request runs alone; otherwise the
                # grammar still gives each next forced token without a mask (`pick`).
                alone = len(self.scheduler.running) == 1
                room = request.max_new_tokens - len(request.generated) if alone else 0
                for token in grammar.forced(room):
                    reason = self._take(request, token, texts, forced=True)
                    if reason is not None:
                        ending = _Ending(reason, last)
                        break
        if texts:
            request.stream._push(Chunk("".join(texts), tuple(request.generated[-len(texts) :])))
        return ending

    def _take(self, request: Request, token: int, texts: list[str], *, forced: bool = False) -> FinishReason | None:
        """Record one generated token and its text; the finish reason if it ends the request."""
        request.record_token(token, forced=forced)
        delta = request.text.push(self.model.token_to_bytes(token))
        texts.append(delta.text)
        if delta.stopped:
            return "stop"
        if len(request.generated) >= request.max_new_tokens:
            return "length"
        return None

    def _reap_cancelled(self) -> None:
        scheduler = self.scheduler
        for request in [r for r in (*scheduler.running, *scheduler.waiting) if r.cancel_requested]:
            self.finish(request, "cancelled")

    # -- ending requests --------------------------------------------------------------------------

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request (running, waiting or never queued) with `reason`; its KV is kept."""
        tail = request.text.finish().text
        usage = request.usage(reason, completion_tokens=len(request.generated))
        self._release(request, keep=True)
        self.stats.counters.count_finished(usage)
        self.publish_stats()
        request.stream._push(Chunk(tail, (), usage))

    def _fail(self, request: Request, error: BaseException) -> None:
        self._release(request, keep=False)  # its KV may be incomplete: keep nothing
        self.publish_stats()
        request.stream._push(error)

    def fail_running(self, error: BaseException) -> None:
        """End every running request with `error` (their KV is dropped)."""
        for request in list(self.scheduler.running):
            self._fail(request, error)

    def _release(self, request: Request, *, keep: bool) -> None:
        """Free a request's sampler and sequence; park its KV in the cache if `keep`."""
        request.close_sampler()
        self.scheduler.remove(request)
        if self.speculator is not None:
            self.speculator.finished(request, keep=keep)
        if request.pinned is not None:
            self.pinned.finish(request, keep=keep)
        else:
            self.pool.finish(request, keep=keep)

    def shutdown(self) -> None:
        """End every running and waiting request (``cancelled``), keep what a disk
        tier should keep, and free the batch. The backend stays open."""
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            self.finish(request, "cancelled")
        try:
            self.pool.persist()
        except Exception:  # never let a cache problem stop the shutdown
            logger.exception("could not persist the prefix cache")
        self._batch.close()

    # -- stats ------------------------------------------------------------------------------------------

    def publish_stats(self) -> None:
        """Take a snapshot for :meth:`Engine.stats`."""
        ngrams = self.speculator.ngram_cache if self.speculator is not None else None
        self.stats.publish(
            self.scheduler,
            self.pool,
            ngram_entries=len(ngrams) if ngrams is not None else 0,
            ngram_bytes=ngrams.bytes if ngrams is not None else 0,
        )


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))
