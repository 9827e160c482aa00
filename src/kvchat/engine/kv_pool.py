"""`KVPool`: who holds which KV cells of one context, and room for more.

The pool owns the context's sequence ids, the cell accounting, the radix tree
of parked entries (:class:`PrefixCache`) and the optional lower tiers
(:class:`StateStore`). It makes room by evicting parked entries (spilling their
state to a lower tier first) and parks finished requests in the tree. Where a
new request's prefix comes from is decided by
:class:`~kvchat.engine.admission.Admission`; conversations' own sequences are
kept by :class:`~kvchat.engine.pinned.PinnedSequences`. Only the engine's worker
thread calls any of them.

The pool is the one door to the KV memory (:class:`~kvchat.engine.backend.KVMemory`):
admission and conversations share, shift, load and save cells through its
methods, and a request's KV record (:class:`~kvchat.engine.request.SequenceKV`:
sequence id, positions held, shared prefix, locked node, reserved cells) is
written here and nowhere else.

Cell accounting: every token in the tree is one KV cell (shared cells are
counted once); every running request reserves the cells it may still add; every
conversation is charged for the cells only it holds. A reservation is made only
when the cells fit in the context, evicting least-recently-used parked entries
until they do, so a decode never runs out of cells.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvchat.engine.backend import KVMemory
from kvchat.engine.prefix_cache import Eviction, IntegrityError, Node, PrefixCache
from kvchat.engine.request import Request, SequenceKV
from kvchat.engine.state_store import SpilledState, StateStore
from kvchat.errors import BackendError


@dataclass
class PoolCounters:
    """Cumulative cache events. `restore_failures` counts spilled states that were
    chosen for a request but could not be loaded (their tokens were evaluated)."""

    evictions: int = 0
    spills: int = 0
    restores: int = 0
    restore_failures: int = 0
    shifts: int = 0


class KVPool:
    """Sequence ids, KV cell reservations and the parked entries of one context."""

    def __init__(self, memory: KVMemory, *, cache: PrefixCache | None, store: StateStore | None) -> None:
        self._memory = memory
        self.cache = cache
        self.store = store if cache is not None else None
        self.counters = PoolCounters()
        self.pinned_cells = 0
        """Cells charged to conversations (shared cells once)."""
        self.state_bytes_per_token: float | None = None
        """Size of spilled state per token, learned from the last spill (None before)."""
        self._free_ids = list(reversed(range(memory.n_seq_max)))
        self._reserved = 0  # cells running requests may still add

    # -- sequence ids and cells --------------------------------------------------------------

    def cells_in_use(self) -> int:
        """Cells of the tree, of conversations and reserved by running requests."""
        tree = self.cache.total_tokens if self.cache is not None else 0
        return tree + self._reserved + self.pinned_cells

    def make_room(self, cells: int, *, need_id: bool = True) -> bool:
        """Evict parked entries until `cells` more cells (and a sequence id, if
        `need_id`) are free. False, evicting nothing, if not even evicting every
        unlocked entry would make room for the cells."""
        if not self._room_possible(cells):
            return False
        while (need_id and not self._free_ids) or self.cells_in_use() + cells > self._memory.n_ctx:
            if not self.evict_lru():
                return False
        return True

    def _room_possible(self, cells: int) -> bool:
        """Whether evicting every unlocked parked entry would free `cells` more cells."""
        evictable = self.cache.evictable_tokens if self.cache is not None else 0
        return self.cells_in_use() + cells - evictable <= self._memory.n_ctx

    def unshare(self, request: Request, cells: int) -> bool:
        """Stop holding the tree entry `request` shares its prefix with locked, if that
        makes room for `cells` more: the request keeps those cells (its sequence holds
        them) and is charged for them; the entry may then be evicted."""
        node = request.locked_node
        if node is None or self.cache is None:
            return False
        self.cache.unlock(node)
        if not self._room_possible(request.shared_prefix + cells):
            self.cache.lock(node)
            return False
        request.kv.locked_node = None
        self.grow_reservation(request, request.shared_prefix)
        request.kv.shared_prefix = 0
        return True

    def take_id(self) -> int:
        """A free sequence id (the caller made room for it)."""
        return self._free_ids.pop()

    def free_id(self, seq_id: int) -> None:
        """Drop every cell of `seq_id` and make the id free."""
        self.remove(seq_id)
        self._free_ids.append(seq_id)

    def reserve(self, request: Request, cells: int, *, seq_id: int | None = None) -> bool:
        """Reserve `cells` for `request` and give it `seq_id` (None: a free id),
        evicting parked entries as needed. False, with nothing changed, if they do not fit."""
        if not self.make_room(cells, need_id=seq_id is None):
            return False
        request.kv.seq_id = self.take_id() if seq_id is None else seq_id
        self.grow_reservation(request, cells)
        return True

    def grow_reservation(self, request: Request, cells: int) -> None:
        """Charge `request` for `cells` more cells that are already counted free
        or that leave another owner's count (the caller checked)."""
        self._reserved += cells
        request.kv.reserved_cells += cells

    def release(self, request: Request) -> None:
        """End `request`'s reservation and its lock on the tree (its sequence id stays set)."""
        if request.locked_node is not None and self.cache is not None:
            self.cache.unlock(request.locked_node)
        request.kv.locked_node = None
        self._reserved -= request.reserved_cells
        request.kv.reserved_cells = 0

    def place(self, request: Request, *, resident: int, shared: int = 0, node: Node | None = None) -> None:
        """Record an admission: `request`'s sequence holds its first `resident`
        tokens, the first `shared` of them shared (with the tree's `node`, whose lock
        the request now holds, or with its conversation)."""
        kv = request.kv
        kv.n_past = kv.resident_prefix = resident
        kv.shared_prefix, kv.locked_node = shared, node

    def share_prefix(self, request: Request, node: Node, length: int) -> None:
        """Admit `request` with the first `length` cells of `node`'s holder shared
        into its (empty) sequence; it holds `node`'s lock from now on."""
        assert node.holder is not None
        self._memory.seq_copy(node.holder, _seq_id(request), 0, length)
        self.place(request, resident=length, shared=length, node=node)

    def publish(self, request: Request) -> bool:
        """Park a running request's evaluated tokens in the tree while it runs on: a new
        parked sequence shares its cells (no copy), so that requests that need the same
        prefix share them at once. The request then shares them with the tree: it locks
        the new entry and is no longer charged for those cells. Tokens the tree came to
        hold meanwhile in other cells (another request parked them) are shared from
        the tree first, in place of the request's own. False, changing nothing, if it
        has nothing new to give or no sequence id can be freed."""
        cache, seq_id, tokens = self.cache, request.seq_id, request.kv_tokens
        if cache is None or seq_id is None or request.pinned is not None or len(tokens) <= request.shared_prefix:
            return False
        if not self.make_room(0):  # (before the lookup: making room may evict what it finds)
            return False
        held = cache.peek(tokens, namespace=request.cache_key)
        if held.length >= len(tokens):
            return False
        if held.length > request.shared_prefix:  # parked since it was admitted: share those cells first
            assert held.node is not None and held.holder is not None
            self.remove(seq_id, request.shared_prefix, held.length)
            self._memory.seq_copy(held.holder, seq_id, request.shared_prefix, held.length)
            self._share_with_tree(request, held.node, held.length)
        holder = self.take_id()
        self._memory.seq_copy(seq_id, holder, 0, len(tokens))
        result = cache.insert(tokens, holder, shared_prefix=request.shared_prefix, namespace=request.cache_key)
        for redundant in result.redundant:  # the entry the request shared from, now a prefix of the new one
            self.free_id(redundant)
        node = cache.peek(tokens, namespace=request.cache_key).node
        assert result.stored and not result.shared_from and node is not None
        self._share_with_tree(request, node, len(tokens))
        return True

    def _share_with_tree(self, request: Request, node: Node, length: int) -> None:
        """`request`'s first `length` cells are now the tree's: it locks `node` (in place of
        the node it locked) and is no longer charged for the cells past its old shared prefix."""
        assert self.cache is not None
        self.cache.lock(node)
        if request.locked_node is not None:
            self.cache.unlock(request.locked_node)
        self._reserved -= length - request.shared_prefix
        request.kv.reserved_cells -= length - request.shared_prefix
        request.kv.shared_prefix, request.kv.locked_node = length, node

    def undo_admission(self, request: Request) -> None:
        """Take back an admission: free the request's sequence and reservation."""
        seq_id = _seq_id(request)
        self.release(request)
        self.free_id(seq_id)
        request.kv = SequenceKV()

    def vacate(self, request: Request) -> None:
        """Forget a request's sequence after :meth:`finish` (it was preempted and waits
        to be admitted again)."""
        assert request.seq_id is None and request.reserved_cells == 0
        request.kv = SequenceKV()

    # -- a running request's cells -----------------------------------------------------------

    def extend(self, request: Request, n: int) -> int:
        """Note that `n` more tokens of `request` are being evaluated into its
        sequence (within its reservation); returns the position of the first."""
        first = request.n_past
        request.kv.n_past += n
        return first

    def drop_tail(self, request: Request, n: int) -> None:
        """Drop the last `n` cells of `request`'s sequence (rejected drafted tokens)."""
        if n:
            self.truncate(request, request.n_past - n)

    def truncate(self, request: Request, length: int) -> None:
        """Drop `request`'s cells from position `length` on."""
        if request.n_past > length:
            self.remove(_seq_id(request), length, -1)
            request.kv.n_past = length

    def remove(self, seq_id: int, start: int = -1, end: int = -1) -> None:
        """Drop `seq_id`'s cells at positions [start, end); `BackendError` if the
        model's memory cannot cut there (recurrent state)."""
        if not self._memory.seq_remove(seq_id, start, end):
            raise BackendError(f"llama.cpp cannot remove positions [{start}, {end}) of sequence {seq_id}")

    def leave(self, request: Request) -> None:
        """End a conversation's request: release its reservation; its sequence stays
        the conversation's."""
        self.release(request)
        request.kv.seq_id = None

    # -- the KV memory, for admission and conversations ----------------------------------------

    def copy_cells(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        """Share `src`'s cells at [start, end) with `dst` (no copy in a unified cache)."""
        self._memory.seq_copy(src, dst, start, end)

    def shift_cells(self, seq_id: int, start: int, end: int, delta: int) -> None:
        """Move the positions of `seq_id`'s cells in [start, end) by `delta`
        (cells no other sequence shares)."""
        self._memory.seq_shift(seq_id, start, end, delta)

    def load_state(self, seq_id: int, state: bytes) -> int:
        """Load state bytes into `seq_id`'s (empty) sequence; returns how many
        positions it holds then. `BackendError` if the memory refuses them."""
        self._memory.set_seq_state(seq_id, state)
        return self._memory.seq_pos_max(seq_id) + 1

    def load_state_part(self, seq_id: int, state: bytes, start: int, end: int) -> int:
        """Load state bytes into a free sequence id for a moment and share its cells at
        positions [start, end) with `seq_id`; returns how many positions the state
        held. `BackendError` if no id is free or the memory refuses them."""
        if not self._free_ids:
            raise BackendError("no free sequence id to load a state through")
        scratch = self._free_ids[-1]
        try:
            held = self.load_state(scratch, state)
            self._memory.seq_copy(scratch, seq_id, start, end)
        finally:
            self.remove(scratch)
        return held

    def state_of(self, seq_id: int) -> bytes:
        """`seq_id`'s state bytes (to save)."""
        return self._memory.seq_state(seq_id)

    @property
    def can_shift(self) -> bool:
        """Whether the memory can move positions."""
        return self._memory.can_shift

    def layout_key(self) -> str:
        """What saved state depends on (see `KVMemory.layout_key`)."""
        return self._memory.layout_key()

    # -- eviction ---------------------------------------------------------------------------

    def evict_lru(self) -> bool:
        """Evict the least recently used unlocked parked entry; False if there is none."""
        eviction = self.cache.evict_lru() if self.cache is not None else None
        if eviction is None:
            return False
        self.evict(eviction)
        return True

    def evict(self, eviction: Eviction) -> None:
        """Carry out an eviction the tree decided: spill the holder's state to a lower
        tier (unless one holds these tokens already), then trim or free the holder.

        To a RAM-only store (`_spills_tails`), only the evicted branch's tail is
        spilled: the state past the prefix that stays in the tree
        (`Eviction.keep`, or what the holder shares with other entries), a fraction
        of the bytes, restored later onto that prefix
        (:class:`~kvchat.engine.state_store.SpilledState`), alone or as a link of a
        chain (a short tail too: a branch evicted piece by piece comes back whole
        only if every piece does). Copying a trimmed holder's tail out takes a free
        sequence id for a moment; without one its whole state is spilled.
        """
        self.counters.evictions += 1
        start = len(eviction.tokens) - eviction.freed_tokens if self._spills_tails else 0
        if start and not eviction.released and not self._free_ids:
            start = 0
        if self.store is not None and not self._store_covers(eviction, start):
            state = self._tail_state(eviction, start) if start else self._memory.seq_state(eviction.seq_id)
            self.state_bytes_per_token = len(state) / (len(eviction.tokens) - start)
            self.store.put(SpilledState(eviction.tokens, eviction.namespace, state, start))
            self.counters.spills += 1
        if eviction.released:
            self.free_id(eviction.seq_id)
        else:
            self.remove(eviction.seq_id, eviction.keep, -1)

    @property
    def _spills_tails(self) -> bool:
        """Whether evictions spill tails: to a RAM tier only. A tier on disk keeps whole
        states, which a restarted server can restore with nothing resident."""
        return self.store is not None and not self.store.has_disk

    def _tail_state(self, eviction: Eviction, start: int) -> bytes:
        """The state of the evicted holder's positions from `start` on: its prefix cut
        off (it is freed next), or its tail copied to a free sequence id and saved."""
        if eviction.released:
            self.remove(eviction.seq_id, 0, start)
            return self._memory.seq_state(eviction.seq_id)
        scratch = self._free_ids[-1]
        self._memory.seq_copy(eviction.seq_id, scratch, start, -1)
        try:
            return self._memory.seq_state(scratch)
        finally:
            self.remove(scratch)

    def measure_state_size(self, seq_id: int, tokens: int) -> float:
        """Bytes of spilled state per token (`state_bytes_per_token`), measured on
        `seq_id`, which holds `tokens` tokens, if no spill has measured it yet."""
        if self.state_bytes_per_token is None:
            self.state_bytes_per_token = len(self._memory.seq_state(seq_id)) / tokens
        return self.state_bytes_per_token

    def _store_covers(self, eviction: Eviction, start: int) -> bool:
        """True if a lower tier already holds these tokens, from `start` on or earlier
        (then copying the state is waste)."""
        assert self.store is not None
        found = self.store.best_match(eviction.tokens, namespace=eviction.namespace, resident=start)
        return found is not None and found.length == len(eviction.tokens)

    # -- finishing ---------------------------------------------------------------------------

    def finish(self, request: Request, *, keep: bool) -> None:
        """Release a request's reservation; park its evaluated tokens in the tree if
        `keep` (or free its sequence)."""
        if request.seq_id is None:
            return
        self.release(request)
        seq_id, request.kv.seq_id = request.seq_id, None
        kv_tokens = request.kv_tokens
        if not (keep and self.cache is not None and kv_tokens):
            self.free_id(seq_id)
            return
        result = self.cache.insert(kv_tokens, seq_id, shared_prefix=request.shared_prefix, namespace=request.cache_key)
        for holder, start, end in result.shared_from:  # tokens the tree had already: share, don't duplicate
            self.remove(seq_id, start, end)
            self._memory.seq_copy(holder, seq_id, start, end)
        for redundant in result.redundant:
            self.free_id(redundant)
        if not result.stored:
            self.free_id(seq_id)

    def persist(self) -> None:
        """Before shutdown: spill every parked entry so that a disk tier keeps it."""
        if self.store is None or not self.store.has_disk:
            return
        while self.evict_lru():
            pass
        self.store.flush_to_disk()
        self.store.close()  # every file written; the writer thread stops

    def check_parked(self) -> None:
        """Raise `IntegrityError` unless every parked sequence holds exactly the
        positions of its tree entry (a check for tests and debugging)."""
        if self.cache is None:
            return
        for seq_id, tokens in self.cache.held_tokens().items():
            held = self._memory.seq_pos_max(seq_id) + 1
            if held != len(tokens):
                raise IntegrityError(f"parked sequence {seq_id} holds {held} positions, its entry {len(tokens)}")

    # -- numbers -----------------------------------------------------------------------------

    @property
    def free_sequences(self) -> int:
        """Sequence ids neither running nor parked nor pinned."""
        return len(self._free_ids)

    @property
    def parked_sequences(self) -> int:
        """Sequence ids holding cached entries."""
        return len(self.cache.holders()) if self.cache is not None else 0

    @property
    def cached_tokens_resident(self) -> int:
        """Tokens held by the prefix cache in the KV pool."""
        return self.cache.total_tokens if self.cache is not None else 0

    @property
    def reserved_cells(self) -> int:
        """Cells running requests may still add."""
        return self._reserved


def _seq_id(request: Request) -> int:
    if request.seq_id is None:
        raise RuntimeError(f"request {request.request_id} has no KV sequence")
    return request.seq_id
