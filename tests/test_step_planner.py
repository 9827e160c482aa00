"""The step planner's calls (pure logic on a real, empty `llama_batch`; no model)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fake_kv import FakeKV

from kvchat.engine.kv_pool import KVPool
from kvchat.engine.request import Request, RequestSpec, SequenceKV
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.settings import EngineSettings
from kvchat.engine.step_planner import LONG_CHUNK_ROWS, StepPlanner
from kvchat.engine.stream import Stream
from kvchat.llama import Batch

EXACT = EngineSettings().interleaved_call_rows
assert EXACT == 63  # the default: below 64 rows, llama.cpp's CPU flash attention skips hidden cells


@dataclass
class Call:
    """What one decode call held: (seq_id, position) per row, and the sampled rows."""

    rows: list[tuple[int, int]]
    sampled: list[tuple[int, int]]  # (seq_id, row)


def prompting(seq_id: int, pending: int, n_past: int = 0) -> Request:
    seq = Request(RequestSpec(seq_id, tuple(range(n_past + pending)), SamplingParams(), 16), Stream(seq_id, lambda: None))
    seq.kv, seq.pending = SequenceKV(seq_id=seq_id, n_past=n_past), list(range(n_past, n_past + pending))
    return seq


def generating(seq_id: int, n_past: int) -> Request:
    seq = prompting(seq_id, 0, n_past)
    seq.generated, seq.pending = [7], [7]
    return seq


def run_step(running: list[Request], capacity: int = 512, call_rows: int | None = EXACT) -> list[Call]:
    calls = []
    pool = KVPool(FakeKV(n_ctx=4096), cache=None, store=None)
    with Batch(capacity) as batch:
        for sampled in StepPlanner(interleaved_call_rows=call_rows).calls(running, batch, pool):
            raw = batch.raw
            rows = [(raw.seq_id[i][0], raw.pos[i]) for i in range(batch.n_tokens)]
            wants = [i for i in range(batch.n_tokens) if raw.logits[i]]
            # Only the rows handed back ask for logits (each with its drafted rows after it).
            assert wants == [r for s in sampled for r in range(s.row, s.row + len(s.draft) + 1)]
            calls.append(Call(rows, [(s.request.seq_id, s.row) for s in sampled]))
    return calls


def test_a_sequence_running_alone_gets_its_chunk_in_one_call() -> None:
    seq = prompting(0, 300, n_past=40)
    [call] = run_step([seq])
    assert call.rows == [(0, p) for p in range(40, 340)]
    assert call.sampled == [(0, 299)]
    assert seq.n_past == 340 and seq.pending == []


def test_a_long_prompt_alone_is_cut_at_the_batch_capacity() -> None:
    seq = prompting(0, 700)
    [call] = run_step([seq], capacity=512)
    assert len(call.rows) == 512 and call.sampled == []  # its last token comes in a later step
    assert seq.n_past == 512 and len(seq.pending) == 188


def test_with_several_sequences_every_call_stays_below_the_tiled_kernel() -> None:
    decoders = [generating(i, 100 + i) for i in range(8)]
    newcomer = prompting(8, LONG_CHUNK_ROWS - 1, n_past=30)  # (a chunk of a tile or more gets its own call)
    calls = run_step([*decoders, newcomer])
    assert all(len(c.rows) <= EXACT for c in calls)
    assert [r for c in calls for r in c.rows] == (
        [(i, 100 + i) for i in range(8)] + [(8, p) for p in range(30, 30 + LONG_CHUNK_ROWS - 1)]  # decode rows first
    )
    assert calls[0].sampled == [(i, i) for i in range(8)]
    assert [s for c in calls for s in c.sampled][8:] == [(8, len(calls[-1].rows) - 1)]
    assert [s.pending for s in decoders] == [[]] * 8 and newcomer.pending == []


def test_a_long_prompt_chunk_among_several_sequences_gets_a_call_of_its_own() -> None:
    """Row by row, a long chunk would cost several times its tiled call (its own cells
    are together): it goes alone and whole; decode rows and short chunks keep the cap."""
    decoders = [generating(i, 100 + i) for i in range(8)]
    long, short = prompting(8, LONG_CHUNK_ROWS + 44, n_past=30), prompting(9, LONG_CHUNK_ROWS - 1)
    calls = run_step([*decoders, long, short])
    long_calls = [c for c in calls if any(seq == 8 for seq, _ in c.rows)]
    assert [c.rows for c in long_calls] == [[(8, p) for p in range(30, 30 + LONG_CHUNK_ROWS + 44)]]
    assert long_calls[0].sampled == [(8, LONG_CHUNK_ROWS + 43)]
    assert all(len(c.rows) <= EXACT for c in calls if c not in long_calls)
    assert [r for c in calls for r in c.rows] == (
        [(i, 100 + i) for i in range(8)] + long_calls[0].rows + [(9, p) for p in range(LONG_CHUNK_ROWS - 1)]
    )
    assert long.pending == [] and short.pending == []


@pytest.mark.parametrize("capacity", [64, 100])
def test_the_step_budget_covers_decode_rows_and_prompt_chunks(capacity: int) -> None:
    first, second = prompting(1, 80), prompting(2, 80)
    running = [generating(0, 10), first, second]
    calls = run_step(running, capacity=capacity)
    evaluated = [r for c in calls for r in c.rows]
    assert len(evaluated) == capacity
    assert first.n_past == min(80, capacity - 1)
    assert second.n_past == max(0, capacity - 81)
    assert len(second.pending) == 80 - second.n_past  # the rest waits for the next step


def test_without_a_row_cap_several_sequences_share_one_call() -> None:
    """`interleaved_call_rows=None` (a GPU build): the step is not split."""
    decoders = [generating(i, 100 + i) for i in range(8)]
    newcomer = prompting(8, 150, n_past=30)
    [call] = run_step([*decoders, newcomer], call_rows=None)
    assert len(call.rows) == 8 + 150
    assert call.sampled == [(i, i) for i in range(8)] + [(8, 157)]


def test_a_custom_row_cap_bounds_every_call() -> None:
    running = [generating(0, 10), prompting(1, LONG_CHUNK_ROWS - 4)]
    calls = run_step(running, call_rows=16)
    assert [len(c.rows) for c in calls] == [16] * 3 + [13]


def test_a_prompt_ending_with_a_draft_is_one_call_sampled_from_its_last_prompt_row() -> None:
    seq = prompting(0, 20, n_past=100)
    seq.draft = (5,) * 44  # what the speculator gives a prompt whose last rows cost more than a tile
    [call] = run_step([seq])
    assert call.rows == [(0, p) for p in range(100, 164)]
    assert call.sampled == [(0, 19)]  # its last prompt token's row; the drafted rows follow it
    assert seq.n_past == 164 and seq.pending == [] and seq.draft == ()
