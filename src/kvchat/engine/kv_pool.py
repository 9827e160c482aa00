"""`KVPool`: who holds which KV cells, and the prefix cache on top of them.

The pool owns the sequence ids of the llama context, the radix tree of resident
token runs (:class:`PrefixCache`) and the optional lower tiers
(:class:`StateStore`). The engine asks it to admit a request (find the longest
cached prefix, make room, share the cells) and to finish one (park its tokens
in the tree, or free them). Only the engine's worker thread calls it.

Cell accounting: every token in the tree is one KV cell (shared cells are
counted once); every running request reserves the cells it may still add
(prompt tokens not taken from the cache, plus `max_new_tokens`). Admission
evicts least-recently-used parked entries until the new reservation fits, so a
decode never runs out of cells while evictable entries exist.

Pool compaction: llama.cpp's attention reads the mask of every KV cell up to
the highest one in use, for every row of every decode call, so parked cells
slow down whatever runs. With `compact` on, each admission also moves the
parked entries the new request does not use into the RAM tier (least recently
used first, while the tier has room): a later restore is a copy of the state,
far cheaper than the attention time they cost while resident
(benchmarks/pool_compaction.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.prefix_cache import Eviction, Node, PrefixCache
from kvchat.engine.sequence import Sequence
from kvchat.engine.state_store import SpilledState, StateStore, StoreMatch
from kvchat.errors import BackendError, InvalidRequestError
from kvchat.llama import Context

logger = logging.getLogger("kvchat.engine")

MIN_RESTORE_GAIN = 16
"""Restore spilled state only when it covers this many more tokens than the KV
pool does: below that, evaluating the tokens is as cheap as copying the state."""

COMPACT_MIN_TOKENS = 4 * MIN_RESTORE_GAIN
"""Pool compaction leaves shorter parked entries in the pool: they cost little
attention time, and a restore of them would rarely pay (`MIN_RESTORE_GAIN`)."""


@dataclass
class PoolCounters:
    """Cumulative cache events."""

    evictions: int = 0
    spills: int = 0
    restores: int = 0
    restore_failures: int = 0
    shifts: int = 0


class _Once:
    """A callable that runs its function the first time only."""

    def __init__(self, function: Callable[[], None]) -> None:
        self._function: Callable[[], None] | None = function

    def __call__(self) -> None:
        function, self._function = self._function, None
        if function is not None:
            function()


@dataclass(frozen=True)
class _OwnPrefix:
    """A prefix loaded as the sequence's own cells (not shared with the tree): `load`
    fills the sequence and sets `cached_tokens`, or returns False and leaves it
    empty. `extra_cells` are needed beyond the request's reservation while it loads."""

    extra_cells: int
    load: Callable[[Sequence], bool]
    release: Callable[[], None] = lambda: None
    """Called once the choice is made: unlocks what the plan locked."""


class KVPool:
    """Sequence ids, KV cell reservations and the prefix cache of one context."""

    def __init__(self, context: Context, *, max_running: int, cache: PrefixCache | None,
                 store: StateStore | None, compact: bool = False) -> None:
        self._context = context
        self._max_running = max_running
        self.cache = cache
        self.store = store if cache is not None else None
        self._compact = compact
        self._state_bytes_per_token: float | None = None  # learned from spills
        self._free_ids = list(reversed(range(context.n_seq_max)))
        self._reserved = 0  # cells running requests may still add
        self.pinned_cells = 0  # cells held by conversations (shared cells once)
        self.counters = PoolCounters()

    # -- admission -----------------------------------------------------------------------

    def try_admit(self, seq: Sequence, n_running: int) -> bool:
        """Give `seq` a sequence id and its cached prefix if room can be made.

        The prefix comes from the KV pool (cells shared, no copy) or, when it
        covers at least `MIN_RESTORE_GAIN` more tokens, from spilled state or (for
        a context-shifted prompt) from the original prompt's KV, shifted. On
        success the sequence's `seq_id`, `n_past`, `cached_tokens` and `pending`
        are set; on failure nothing changes and the request waits.
        """
        if n_running >= self._max_running:
            return False
        if seq.pinned is not None:
            return self._admit_pinned(seq)
        usable, holder, node = self._match(seq)
        if node is not None:
            self.cache.lock(node)  # the matched path must survive the evictions below
        if self._compact:
            self._spill_parked()
        own = self._spilled_match(seq, usable) or self._shift_match(seq, usable)
        if own is not None and not self._reserve(seq, len(seq.prompt) + seq.max_new_tokens + own.extra_cells):
            own.release()
            own = None  # no room for the copy: share what the pool has instead
        if own is None and not self._reserve(seq, len(seq.prompt) + seq.max_new_tokens - usable):
            if node is not None:
                self.cache.unlock(node)
            return False
        loaded = own is not None and own.load(seq)
        if own is not None:
            own.release()
        if loaded:
            if node is not None:
                self.cache.unlock(node)
            seq.shared_prefix = 0  # copied cells are this sequence's own, not the tree's
        elif usable:
            self._context.seq_copy(holder, seq.seq_id, 0, usable)
            seq.locked_node = node
            seq.cached_tokens = seq.shared_prefix = usable
        elif node is not None:
            self.cache.unlock(node)
        seq.n_past = seq.cached_tokens
        seq.pending = list(seq.prompt[seq.cached_tokens:])
        return True

    def _admit_pinned(self, seq: Sequence) -> bool:
        """A conversation's request runs in the conversation's own sequence."""
        pinned = seq.pinned
        if not self._make_room(len(seq.prompt) - len(pinned.tokens) + seq.max_new_tokens, need_id=False):
            return False
        cells = len(seq.prompt) - len(pinned.tokens) + seq.max_new_tokens
        seq.seq_id = pinned.seq_id
        self._reserved += cells
        seq.reserved_cells = cells
        seq.cached_tokens = seq.shared_prefix = seq.n_past = len(pinned.tokens)
        seq.pending = list(seq.prompt[seq.n_past:])
        return True

    def _reserve(self, seq: Sequence, cells: int) -> bool:
        """Take a sequence id and reserve `cells` for `seq`, evicting if needed."""
        if not self._make_room(cells):
            return False
        seq.seq_id = self._free_ids.pop()
        self._reserved += cells
        seq.reserved_cells = cells
        return True

    @staticmethod
    def _usable(seq: Sequence, matched: int) -> int:
        """A match's usable length: at least one prompt token is evaluated, for fresh logits."""
        return max(0, min(matched, len(seq.prompt) - 1))

    def _match(self, seq: Sequence) -> tuple[int, int | None, Node | None]:
        if self.cache is None:
            return 0, None, None
        found = self.cache.match(seq.prompt, namespace=seq.cache_key)
        usable = self._usable(seq, found.length)
        if usable == 0:
            return 0, None, None
        return usable, found.holder, found.node

    def _spilled_match(self, seq: Sequence, usable: int) -> _OwnPrefix | None:
        if self.store is None:
            return None
        found = self.store.best_match(seq.prompt, namespace=seq.cache_key)
        if found is None or self._usable(seq, found.length) < usable + MIN_RESTORE_GAIN:
            return None
        return _OwnPrefix(extra_cells=0, load=lambda s: self._restore(s, found))

    def _restore(self, seq: Sequence, spilled: StoreMatch) -> bool:
        """Load spilled state into the request's (empty) sequence, trimmed to the prompt."""
        entry = self.store.take(spilled)
        if entry is not None:
            try:
                self._context.set_seq_state(seq.seq_id, entry.state)
            except BackendError:
                logger.warning("restoring %d cached tokens failed; evaluating them instead", spilled.length)
                self._context.seq_remove(seq.seq_id)
            else:
                seq.cached_tokens = self._usable(seq, spilled.length)
                self._context.seq_remove(seq.seq_id, seq.cached_tokens, -1)
                self.counters.restores += 1
                return True
        self.counters.restore_failures += 1
        return False

    def _shift_match(self, seq: Sequence, usable: int) -> _OwnPrefix | None:
        """For a shifted prompt: the original's cached KV, if it reaches past the cut."""
        shift = seq.shift
        if shift is None or self.cache is None:
            return None
        found = self.cache.match(shift.original, namespace=seq.original_cache_key)
        cut_end = shift.n_keep + shift.n_drop
        if found.length <= cut_end or self._usable(seq, found.length - shift.n_drop) < usable + MIN_RESTORE_GAIN:
            return None
        holder, length, node = found.holder, found.length, found.node
        self.cache.lock(node)  # the holder must survive the evictions that make room
        unlock = _Once(lambda: self.cache.unlock(node))
        # The moved cells are counted in the tree until the take-over, in the reservation after it.
        moved = self._usable(seq, length - shift.n_drop)
        return _OwnPrefix(extra_cells=-moved,
                          load=lambda s: self._take_over_and_shift(s, holder, length, unlock, moved),
                          release=unlock)

    def _take_over_and_shift(
        self, seq: Sequence, holder: int, length: int, unlock: Callable[[], None], moved: int
    ) -> bool:
        """Move the original's cells into `seq`, drop the shift's cut, move the rest back.

        Positions are shifted in place, so the moved cells must belong to `seq`
        alone: the holder leaves the cache (its exact entry is spilled if a lower
        tier exists), and if other cached entries still share cells past the cut,
        only the kept head is reused.
        """
        shift, ctx, target = seq.shift, self._context, seq.seq_id
        ctx.seq_copy(holder, target, 0, length)
        unlock()
        self._reserved += moved  # from now on the request holds these cells itself
        seq.reserved_cells += moved
        try:
            evictions = self.cache.evict_sequence(holder)
        except ValueError:  # a running request shares those cells: leave them alone
            ctx.seq_remove(target)  # (the reservation stays larger than needed: safe)
            return False
        for eviction in evictions:
            self._apply(eviction)
        still_shared = self.cache.peek(shift.original[:length], namespace=seq.original_cache_key).length
        cut_end = shift.n_keep + shift.n_drop
        if still_shared > cut_end:
            seq.cached_tokens = self._usable(seq, shift.n_keep)
            ctx.seq_remove(target, seq.cached_tokens, -1)
            return True
        ctx.seq_remove(target, shift.n_keep, cut_end)
        ctx.seq_shift(target, cut_end, length, -shift.n_drop)
        seq.cached_tokens = self._usable(seq, length - shift.n_drop)
        ctx.seq_remove(target, seq.cached_tokens, -1)
        self.counters.shifts += 1
        return True

    def _make_room(self, need: int, *, need_id: bool = True) -> bool:
        """Evict parked entries until a sequence id (if `need_id`) and `need` cells are free."""
        while (need_id and not self._free_ids) or self._cells_in_use() + need > self._context.n_ctx:
            if self.cache is None or not self._evict_one():
                return False
        return True

    def _spill_parked(self) -> None:
        """Move unlocked parked entries to the RAM tier, least recently used first,
        while it has room for them (an entry that would push another out stays)."""
        if self.cache is None or self.store is None:
            return
        while (leaf := self.cache.lru_leaf(COMPACT_MIN_TOKENS)) is not None and self._ram_fits(leaf.end):
            self._apply(self.cache.evict_leaf(leaf))

    def _ram_fits(self, tokens: int) -> bool:
        room = self.store.ram_room_bytes
        if self._state_bytes_per_token is None:  # size unknown until the first spill
            return self.store.ram_budget_bytes > 0 and room == self.store.ram_budget_bytes
        return tokens * self._state_bytes_per_token <= room

    def _cells_in_use(self) -> int:
        tree = self.cache.total_tokens if self.cache is not None else 0
        return tree + self._reserved + self.pinned_cells

    def _evict_one(self) -> bool:
        eviction = self.cache.evict_lru()
        if eviction is None:
            return False
        self._apply(eviction)
        return True

    def _apply(self, eviction: Eviction) -> None:
        self.counters.evictions += 1
        if self.store is not None and not self._store_covers(eviction):
            state = self._context.seq_state(eviction.seq_id)
            self._state_bytes_per_token = len(state) / len(eviction.tokens)
            self.store.put(SpilledState(eviction.tokens, eviction.namespace, state))
            self.counters.spills += 1
        if eviction.released:
            self._free_id(eviction.seq_id)
        else:
            self._context.seq_remove(eviction.seq_id, eviction.keep, -1)

    def _store_covers(self, eviction: Eviction) -> bool:
        """True if a lower tier already holds these tokens (then copying the state is waste)."""
        found = self.store.best_match(eviction.tokens, namespace=eviction.namespace)
        return found is not None and found.length == len(eviction.tokens)

    # -- finishing -----------------------------------------------------------------------

    def finish(self, seq: Sequence, *, keep: bool) -> None:
        """Release a request's reservation; park its tokens in the cache if `keep`."""
        if seq.seq_id is None:
            return
        if seq.locked_node is not None:
            self.cache.unlock(seq.locked_node)
            seq.locked_node = None
        self._reserved -= seq.reserved_cells
        seq.reserved_cells = 0
        seq_id, seq.seq_id = seq.seq_id, None
        kv_tokens = (seq.prompt + tuple(seq.generated))[: seq.n_past]
        if seq.pinned is not None:
            self._finish_pinned(seq.pinned, kv_tokens, keep=keep)
            seq.pinned.unevaluated = list((seq.prompt + tuple(seq.generated))[seq.n_past:]) if keep else []
            seq.pinned.generating = False
            return
        if not (keep and self.cache is not None and kv_tokens):
            self._free_id(seq_id)
            return
        result = self.cache.insert(kv_tokens, seq_id, shared_prefix=seq.shared_prefix, namespace=seq.cache_key)
        for holder, start, end in result.shared_from:  # tokens the tree had already: share, don't duplicate
            self._context.seq_remove(seq_id, start, end)
            self._context.seq_copy(holder, seq_id, start, end)
        for redundant in result.redundant:
            self._free_id(redundant)
        if not result.stored:
            self._free_id(seq_id)

    # -- conversations (pinned sequences) --------------------------------------------------------

    def pin(self) -> PinnedSequence:
        """A new, empty pinned sequence (evicting a parked entry if no id is free)."""
        if not self._make_room(0):
            raise InvalidRequestError("no free KV sequence for a new conversation", field="conversation")
        return PinnedSequence(self._free_ids.pop())

    def _finish_pinned(self, pinned: PinnedSequence, kv_tokens: tuple[int, ...], *, keep: bool) -> None:
        if not keep:  # the batch failed: its cells may be partial, keep what was there
            self._context.seq_remove(pinned.seq_id, len(pinned.tokens), -1)
            return
        self.pinned_cells += len(kv_tokens) - len(pinned.tokens)
        pinned.own_cells += len(kv_tokens) - len(pinned.tokens)
        pinned.tokens = list(kv_tokens)

    def fork(self, pinned: PinnedSequence) -> PinnedSequence:
        """A new pinned sequence sharing every cell of `pinned` (no copy)."""
        child = self.pin()
        self._context.seq_copy(pinned.seq_id, child.seq_id, 0, len(pinned.tokens))
        child.tokens = list(pinned.tokens)
        child.parent, child.fork_point = pinned, len(pinned.tokens)
        pinned.children.append(child)
        return child

    def truncate(self, pinned: PinnedSequence, length: int) -> None:
        """Drop `pinned`'s cells from position `length` on."""
        dropped = len(pinned.tokens) - length
        self._context.seq_remove(pinned.seq_id, length, -1)
        self._hand_over_shared(pinned, length)
        freed = min(dropped, pinned.own_cells)  # cells below the fork point stay with the parent
        pinned.own_cells -= freed
        self.pinned_cells -= freed
        pinned.fork_point = min(pinned.fork_point, length)
        del pinned.tokens[length:]

    def shift_left(self, pinned: PinnedSequence, keep: int, n: int) -> None:
        """Drop `n` cells after the first `keep` and move the rest back by `n`."""
        if not self._context.can_shift:
            raise InvalidRequestError("this model's KV positions cannot be shifted", field="shift_left")
        if pinned.children or pinned.parent is not None:
            raise InvalidRequestError("cannot shift a conversation that shares cells with a fork",
                                      field="shift_left")
        self._context.seq_remove(pinned.seq_id, keep, keep + n)
        self._context.seq_shift(pinned.seq_id, keep + n, -1, -n)
        del pinned.tokens[keep:keep + n]
        pinned.own_cells -= n
        self.pinned_cells -= n

    def sequence_state(self, seq_id: int) -> bytes:
        """The KV state bytes of one sequence."""
        return self._context.seq_state(seq_id)

    def layout_key(self) -> str:
        """What saved state depends on: the model file and the KV layout."""
        return self._context.layout_key()

    def restore(self, tokens: list[int], state: bytes) -> PinnedSequence:
        """A pinned sequence loaded from saved state bytes."""
        pinned = self.pin()
        try:
            self._context.set_seq_state(pinned.seq_id, state)
        except BackendError:
            self._free_id(pinned.seq_id)
            raise
        pinned.tokens = list(tokens)
        pinned.own_cells = len(tokens)
        self.pinned_cells += len(tokens)
        return pinned

    def unpin(self, pinned: PinnedSequence) -> None:
        """Release a conversation's sequence (cells shared with forks stay with them)."""
        self.truncate(pinned, 0)
        if pinned.parent is not None:
            pinned.parent.children.remove(pinned)
        for child in pinned.children:
            child.parent = None
        pinned.closed = True
        self._free_id(pinned.seq_id)

    def _hand_over_shared(self, pinned: PinnedSequence, length: int) -> None:
        """Cells [length, fork point) that forks still hold become the first fork's own."""
        sharing = [c for c in pinned.children if c.fork_point > length]
        if not sharing:
            return
        heir, others = sharing[0], sharing[1:]
        handed = heir.fork_point - length
        heir.own_cells += handed
        self.pinned_cells += handed
        for child in others:
            pinned.children.remove(child)
            child.parent = heir
            heir.children.append(child)
        heir.fork_point = length

    def _free_id(self, seq_id: int) -> None:
        self._context.seq_remove(seq_id)
        self._free_ids.append(seq_id)

    def persist(self) -> None:
        """Before shutdown: spill every parked entry so that a disk tier keeps it."""
        if self.store is None or not self.store.has_disk:
            return
        while self._evict_one():
            pass
        self.store.flush_to_disk()

    def clear(self) -> None:
        """Drop every parked entry (running requests are not affected)."""
        if self.cache is not None:
            for seq_id in self.cache.clear():
                self._free_id(seq_id)

    # -- numbers ---------------------------------------------------------------------------

    @property
    def free_sequences(self) -> int:
        """Sequence ids neither running nor parked."""
        return len(self._free_ids)

    @property
    def parked_sequences(self) -> int:
        """Sequence ids holding cached entries."""
        return len(self.cache.holders()) if self.cache is not None else 0

    @property
    def cached_tokens_resident(self) -> int:
        """Tokens held by the prefix cache in the KV pool."""
        return self.cache.total_tokens if self.cache is not None else 0
