"""`StepPlanner`: decides which tokens each `llama_decode` call of a step evaluates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvchat.engine.kv_pool import KVPool
from kvchat.engine.request import Request
from kvchat.engine.speculation import TILE_ROWS
from kvchat.llama import Batch


@dataclass(frozen=True)
class ScheduledRow:
    """A batch row whose logits a sequence samples from after the decode.

    With a `draft`, the rows after `row` hold the drafted tokens, each with its
    logits: the sequence samples at `row`, then at each drafted position while
    the drafted tokens match what it sampled. Tokens a grammar forced after the
    last sampled one come before `row`, without logits.
    """

    request: Request
    row: int
    draft: tuple[int, ...] = ()


@dataclass
class _Segment:
    request: Request
    tokens: list[int]
    logits_from: int | None
    """Index of the first token whose logits are wanted (the last prompt token, or the
    last sampled token of a decoding sequence, and every drafted token after it);
    None for a prompt chunk that is not the prompt's last."""
    draft: tuple[int, ...] = ()
    whole: bool = False
    """A drafting or decoding sequence's segment: it stays in one call."""


LONG_CHUNK_ROWS = TILE_ROWS
"""A prompt chunk of this many rows or more (one tile of llama.cpp's CPU attention) gets
a `llama_decode` call of its own, not cut at the interleaved row cap: row by row, every
row pays for every cached cell it sees, about 13 times the tiled kernel's price
(benchmarks/verify_costs.py; an 80-row turn after 1,000 cached tokens: about 1.5 s
row by row, 0.6 s as its own call)."""


class StepPlanner:
    """Plans one engine step: which tokens it evaluates, in which `llama_decode` calls.

    The step takes the decode tokens of every generating sequence first (so
    streams keep flowing: its last sampled token, any tokens its grammar forced
    after it, and its draft; or a prompt's last rows followed by a draft), then
    prompt chunks in arrival order, up to the batch capacity. A prompt can span
    several steps (chunked prefill); only its last token asks for logits. The
    step's tokens then go to llama.cpp in one or more calls on the same batch,
    sampled after each call.

    The calls are shaped for llama.cpp's CPU flash attention. A call of 64 rows or
    more is computed in 64x64 tiles, and a tile is skipped only when the mask
    hides it from every row of the tile; below 64 rows every row skips each hidden
    cell on its own. While several sequences run, their tokens take turns in the
    cache, so each one's cells are spread among the others' and tiles rarely
    skip: the step is then cut into calls of at most `interleaved_call_rows` rows
    (``EngineSettings.interleaved_call_rows``; 63 by default, None for one call).
    A sequence running alone has its cells together and gets one call (the tiled
    kernel is the faster one on contiguous cells). So does a long prompt chunk
    (`LONG_CHUNK_ROWS` or more) while others run: its own cells are together, and
    row by row it would cost several times more (a 504-token chunk after 1,000
    cached tokens: 3.7x; after 6,000: 8x, measured on Qwen 0.5B, 2 cores; the
    tiled kernel's price per cell is about a thirteenth of the row-by-row one's at
    any chunk size from 64 rows).

    The figures behind this are measured by benchmarks/attention_calls.py (see
    docs/benchmarks.md, where the engine's calls are cut at 63 rows).
    """

    def __init__(self, *, interleaved_call_rows: int | None) -> None:
        self._interleaved_call_rows = interleaved_call_rows

    def calls(self, running: Sequence[Request], batch: Batch, pool: KVPool) -> Iterator[list[ScheduledRow]]:
        """Fill `batch` for each call of the step in turn, extending each sequence
        in `pool`, and yield the rows to sample from after that call.

        The caller decodes the batch (and samples) before asking for the next call.
        """
        call_rows = self.call_rows(len(running), batch.capacity)
        segments = self._plan(running, batch.capacity, call_rows)
        batch.clear()
        rows: list[ScheduledRow] = []
        for segment in segments:
            request, tokens = segment.request, segment.tokens
            own_call = not segment.whole and len(tokens) >= LONG_CHUNK_ROWS and call_rows < batch.capacity
            rows_cap = batch.capacity if own_call else call_rows
            if batch.n_tokens and (own_call or (segment.whole and call_rows - batch.n_tokens < len(tokens))):
                yield rows
                batch.clear()
                rows = []
            done = 0
            while done < len(tokens):
                if batch.n_tokens == rows_cap:
                    yield rows
                    batch.clear()
                    rows = []
                part = tokens[done : done + rows_cap - batch.n_tokens]
                logits_from = segment.logits_from
                if logits_from is not None and logits_from >= done + len(part):
                    logits_from = None  # its logits come in a later part
                elif logits_from is not None:
                    logits_from = max(0, logits_from - done)
                first = pool.extend(request, len(part))
                row = batch.add_chunk(part, first, _seq_id(request), logits_from=logits_from)
                done += len(part)
                if logits_from is not None:
                    rows.append(ScheduledRow(request, row - len(segment.draft), segment.draft))
            if own_call:
                yield rows
                batch.clear()
                rows = []
        if batch.n_tokens:
            yield rows

    def call_rows(self, running: int, capacity: int) -> int:
        """Most rows in one `llama_decode` call of a step with `running` sequences."""
        if running > 1 and self._interleaved_call_rows is not None:
            return min(capacity, self._interleaved_call_rows)
        return capacity

    @staticmethod
    def _plan(running: Sequence[Request], capacity: int, call_rows: int) -> list[_Segment]:
        """The step's segments, taken from `pending` (and `draft`, which is cleared)."""
        segments: list[_Segment] = []
        budget = capacity
        for request in running:
            feed = request.pending
            # A drafting request's draft follows its last token in one call: a decoding
            # request's, or the draft after a prompt that ends in this step.
            if (request.is_decoding or request.draft) and len(feed) <= min(budget, call_rows):
                draft = request.draft[: min(budget, call_rows) - len(feed)]
                request.pending, request.draft = [], ()
                segments.append(_Segment(request, [*feed, *draft], len(feed) - 1, draft, whole=True))
                budget -= len(feed) + len(draft)
        for request in running:
            request.draft = ()
            if not request.pending or not budget:
                continue
            take = min(len(request.pending), budget)
            chunk, request.pending = request.pending[:take], request.pending[take:]
            segments.append(_Segment(request, chunk, None if request.pending else take - 1))
            budget -= take
        return segments


def _seq_id(request: Request) -> int:
    if request.seq_id is None:
        raise RuntimeError(f"request {request.request_id} is scheduled without a KV sequence")
    return request.seq_id
