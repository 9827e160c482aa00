"""`PinnedSequences`: the operations on conversations' KV sequences.

Pin, run a request in, fork, truncate, shift, restore and unpin a
:class:`~kvchat.engine.pinned.PinnedSequence`, against the
:class:`~kvchat.engine.kv_pool.KVPool`, on the engine's worker thread (a
:class:`~kvchat.engine.conversation.Conversation` asks for them through the engine).
"""

from __future__ import annotations

import logging

from kvchat.engine.kv_pool import KVPool
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.request import Request
from kvchat.errors import BackendError, ConversationFileError, InvalidRequestError

logger = logging.getLogger("kvchat.engine")


class PinnedSequences:
    """Conversation operations on a :class:`KVPool` (worker thread only)."""

    def __init__(self, pool: KVPool) -> None:
        self._pool = pool

    def pin(self) -> PinnedSequence:
        """A new, empty pinned sequence (evicting a parked entry if no id is free)."""
        if not self._pool.make_room(0):
            raise InvalidRequestError("no free KV sequence for a new conversation", field="conversation")
        return PinnedSequence(self._pool.take_id())

    # -- a conversation's request -------------------------------------------------------------

    def admit(self, request: Request) -> bool:
        """Run `request` in its conversation's own sequence: only the tokens past the
        resident ones are evaluated. False if its cells do not fit yet."""
        pinned = request.pinned
        assert pinned is not None
        cells = len(request.prompt) - len(pinned.tokens) + request.decode_cells()
        if not self._pool.reserve(request, cells, seq_id=pinned.seq_id):
            return False
        resident = len(pinned.tokens)
        self._pool.place(request, resident=resident, shared=resident)
        request.cached_tokens = resident
        request.pending = list(request.prompt[resident:])
        return True

    def finish(self, request: Request, *, keep: bool) -> None:
        """End a conversation's request: its evaluated tokens become resident if
        `keep`; otherwise (the batch failed, its cells may be partial) the
        sequence goes back to what it held before."""
        pinned = request.pinned
        assert pinned is not None
        if request.seq_id is None:
            return
        self._pool.leave(request)
        kv_tokens = request.kv_tokens
        if keep:
            added = len(kv_tokens) - len(pinned.tokens)
            self._pool.pinned_cells += added
            pinned.own_cells += added
            pinned.tokens = list(kv_tokens)
            pinned.unevaluated = list(request.all_tokens[request.n_past :])
        else:
            try:
                self._pool.remove(pinned.seq_id, len(pinned.tokens), -1)
            except BackendError:  # recurrent memory cannot be cut back: drop tokens and KV together
                logger.warning("conversation state could not be rolled back after a failed batch; it is cleared")
                self.truncate(pinned, 0)
            pinned.unevaluated = []
        pinned.generating = False

    # -- KV operations ----------------------------------------------------------------------------

    def fork(self, pinned: PinnedSequence) -> PinnedSequence:
        """A new pinned sequence sharing every cell of `pinned` (no copy)."""
        child = self.pin()
        self._pool.copy_cells(pinned.seq_id, child.seq_id, 0, len(pinned.tokens))
        child.tokens = list(pinned.tokens)
        child.parent, child.fork_point = pinned, len(pinned.tokens)
        pinned.children.append(child)
        return child

    def truncate(self, pinned: PinnedSequence, length: int) -> None:
        """Drop `pinned`'s cells from position `length` on. Models whose memory
        cannot be cut at a token (recurrent, hybrid) refuse with
        `InvalidRequestError`, changing nothing."""
        if length < len(pinned.tokens):
            try:
                self._pool.remove(pinned.seq_id, length, -1)
            except BackendError as exc:
                raise InvalidRequestError(
                    "this model's state cannot be cut at a token (recurrent or hybrid "
                    "memory): a conversation on it cannot rewind",
                    field="n",
                ) from exc
        dropped = len(pinned.tokens) - length
        self._hand_over_shared(pinned, length)
        freed = min(dropped, pinned.own_cells)  # cells below the fork point stay with the parent
        pinned.own_cells -= freed
        self._pool.pinned_cells -= freed
        pinned.fork_point = min(pinned.fork_point, length)
        del pinned.tokens[length:]

    def shift_left(self, pinned: PinnedSequence, keep: int, n: int) -> None:
        """Drop `n` cells after the first `keep` and move the rest back by `n`."""
        if not self._pool.can_shift:
            raise InvalidRequestError("this model's KV positions cannot be shifted", field="shift_left")
        if pinned.children or pinned.parent is not None:
            raise InvalidRequestError("cannot shift a conversation that shares cells with a fork", field="shift_left")
        self._pool.remove(pinned.seq_id, keep, keep + n)
        self._pool.shift_cells(pinned.seq_id, keep + n, -1, -n)
        del pinned.tokens[keep : keep + n]
        pinned.own_cells -= n
        self._pool.pinned_cells -= n

    def state(self, pinned: PinnedSequence) -> tuple[bytes, str]:
        """The KV state bytes of `pinned` and the layout key they belong to."""
        return self._pool.state_of(pinned.seq_id), self._pool.layout_key()

    def layout_key(self) -> str:
        """What saved state depends on: the model file and the KV layout."""
        return self._pool.layout_key()

    def restore(self, tokens: list[int], state: bytes) -> PinnedSequence:
        """A pinned sequence loaded from saved state bytes.

        The state must hold positions ``[0, len(tokens))``, the positions of
        `tokens`: otherwise `ConversationFileError` is raised, and the cells
        loaded are freed again (as on `BackendError`, if llama.cpp refuses them).
        """
        pinned = self.pin()
        try:
            held = self._pool.load_state(pinned.seq_id, state)
            if held != len(tokens):
                raise ConversationFileError(
                    f"holds KV state for {held} positions but lists {len(tokens)} tokens", field="path"
                )
        except (BackendError, ConversationFileError):
            self._pool.free_id(pinned.seq_id)
            raise
        pinned.tokens = list(tokens)
        pinned.own_cells = len(tokens)
        self._pool.pinned_cells += len(tokens)
        return pinned

    def unpin(self, pinned: PinnedSequence) -> None:
        """Release a conversation's sequence (cells shared with forks stay with them)."""
        self._hand_over_shared(pinned, 0)
        self._pool.pinned_cells -= pinned.own_cells
        pinned.own_cells = 0
        pinned.tokens.clear()
        if pinned.parent is not None:
            pinned.parent.children.remove(pinned)
        for child in pinned.children:
            child.parent = None
        pinned.closed = True
        self._pool.free_id(pinned.seq_id)

    def _hand_over_shared(self, pinned: PinnedSequence, length: int) -> None:
        """Before `pinned` drops its positions from `length` on, hand the cells its
        forks still share to them.

        `pinned` is charged for the positions from its own start (its fork point,
        0 for a root) on. Of the forks sharing positions past `length`, the one
        sharing the most becomes the owner of the cells `pinned` was charged for
        up to its fork point, and the other such forks share from it; forks that
        share only cells `pinned` itself shared from its parent move to that parent.
        """
        sharing = [c for c in pinned.children if c.fork_point > length]
        if not sharing:
            return
        own_start = pinned.fork_point if pinned.parent is not None else 0
        cut = max(length, own_start)
        for child in sharing:
            pinned.children.remove(child)
        owners = [c for c in sharing if c.fork_point > cut]
        for child in sharing:
            if child.fork_point <= cut:  # only when length < own_start: the cells are the parent's
                assert pinned.parent is not None
                child.parent = pinned.parent
                pinned.parent.children.append(child)
        if not owners:
            return
        heir = max(owners, key=lambda c: c.fork_point)
        handed = heir.fork_point - cut
        heir.own_cells += handed
        self._pool.pinned_cells += handed
        for child in owners:
            if child is not heir:
                child.parent = heir
                heir.children.append(child)
        heir.parent = pinned if length >= own_start else pinned.parent
        heir.fork_point = cut
        if heir.parent is not None:
            heir.parent.children.append(heir)
