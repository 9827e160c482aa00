"""`Scheduler`: decides which tokens go into the next batch."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from kvchat.engine.sequence import Sequence
from kvchat.llama import Batch


@dataclass(frozen=True)
class ScheduledRow:
    """A batch row whose logits a sequence samples from after the decode."""

    sequence: Sequence
    row: int


class Scheduler:
    """Fills one batch per step: one decode token for every generating sequence
    first (so streams keep flowing), then prompt chunks in arrival order up to
    the batch capacity. A prompt can span several steps (chunked prefill); only
    its last token asks for logits.
    """

    def next_batch(self, running: SequenceOf[Sequence], batch: Batch) -> list[ScheduledRow]:
        """Clear `batch`, fill it from `running`, advance each sequence's position,
        and return the rows to sample from after the decode."""
        batch.clear()
        rows: list[ScheduledRow] = []
        for seq in running:
            if seq.is_generating and seq.pending and batch.free_slots:
                token = seq.pending.pop()
                row = batch.add(token, seq.n_past, _seq_id(seq), logits=True)
                seq.n_past += 1
                rows.append(ScheduledRow(seq, row))
        for seq in running:
            if seq.is_generating or not seq.pending or not batch.free_slots:
                continue
            take = min(len(seq.pending), batch.free_slots)
            chunk, seq.pending = seq.pending[:take], seq.pending[take:]
            finishes_prompt = not seq.pending
            row = batch.add_chunk(chunk, seq.n_past, _seq_id(seq), logits_last=finishes_prompt)
            seq.n_past += take
            if finishes_prompt:
                rows.append(ScheduledRow(seq, row))
        return rows


def _seq_id(seq: Sequence) -> int:
    if seq.seq_id is None:
        raise RuntimeError(f"request {seq.request_id} is scheduled without a KV sequence")
    return seq.seq_id
