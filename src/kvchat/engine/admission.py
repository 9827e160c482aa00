"""`Admission`: where a new request's cached prefix comes from, and room for it.

Admitting a request is two steps. First a plain :class:`AdmissionPlan` is made
for each source that can give the prompt's prefix:

- ``tree``: cells shared from a parked sequence of the prefix cache (no copy);
- ``spilled``: state spilled to the RAM or disk tier, loaded into the request's
  own sequence (when it covers at least `MIN_RESTORE_GAIN` more tokens);
- ``shifted``: for a context-shifted prompt, the original prompt's cells, taken
  over from their holder, with the dropped positions cut out and the rest moved
  back (likewise);
- ``none``: nothing cached; every prompt token is evaluated.

Then :meth:`Admission.admit` carries out the first of spilled, shifted, tree,
and none whose cells can be reserved: a plan that loads the request's own cells
is made only when it gives `MIN_RESTORE_GAIN` more tokens than the tree, and
``none`` comes last, for a request whose shared prefix would keep the entry
holding it locked while the request needs that entry's room.
If loading spilled or shifted state fails, the request falls back to the tree
plan. Either way the request ends up
holding exactly :func:`cells_to_reserve` for what it shares with the tree (the
one place that says how many cells a request holds back); if the difference
cannot be made room for, the admission is undone and the request waits.

Pool compaction: llama.cpp's attention reads the mask of every KV cell up to
the highest one in use, for every row of every decode call, so parked cells
slow down whatever runs. With `compact` on, each admission first moves the
parked entries the new request does not use (the tree plan's and the shifted
plan's are locked by then) into the RAM tier (least recently
used first, while the tier has room): a later restore is a copy of the state,
far cheaper than the attention time they cost while resident
(benchmarks/pool_compaction.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from kvchat.engine.kv_pool import KVPool
from kvchat.engine.prefix_cache import Node
from kvchat.engine.request import Request
from kvchat.engine.state_store import StoreMatch
from kvchat.errors import BackendError

logger = logging.getLogger("kvchat.engine")

MIN_RESTORE_GAIN = 16
"""Restore spilled state only when it covers this many more tokens than the KV
pool does: below that, evaluating the tokens is as cheap as copying the state."""

COMPACT_MIN_TOKENS = 4 * MIN_RESTORE_GAIN
"""Pool compaction leaves shorter parked entries in the pool: they cost little
attention time, and a restore of them would rarely pay (`MIN_RESTORE_GAIN`)."""

PrefixSource = Literal["none", "tree", "spilled", "shifted"]


@dataclass(frozen=True)
class AdmissionPlan:
    """How one request gets its KV sequence.

    `prefix_tokens` prompt tokens come from `source`; the request reserves
    `reserve_cells` cells at admission. `node` is the tree node the tokens come
    from (``tree`` and ``shifted``): it stays locked while the plan may still be
    carried out, and its holder is read only then (making room evicts other
    entries, which can hand the node to another holder). `source_tokens` is how
    many positions of the holder are taken (``shifted``: before the cut),
    `spilled` the stored entry (``spilled``).
    """

    source: PrefixSource
    prefix_tokens: int
    reserve_cells: int
    node: Node | None = None
    source_tokens: int = 0
    spilled: StoreMatch | None = None


def cells_to_reserve(request: Request, prefix_tokens: int) -> int:
    """Cells a request holds back at admission when `prefix_tokens` of its tokens
    are not its own new cells: the rest of its tokens, and room for what it
    generates until its reservation next grows (`Request.decode_cells`)."""
    return len(request.admission_tokens) - prefix_tokens + request.decode_cells()


def usable_prefix(request: Request, matched: int) -> int:
    """A match's usable length: at least one token is evaluated, for fresh logits."""
    return max(0, min(matched, len(request.admission_tokens) - 1))


class Admission:
    """Admits waiting requests into a :class:`KVPool` (worker thread only)."""

    def __init__(self, pool: KVPool, *, compact: bool) -> None:
        self._pool = pool
        self._compact = compact

    def admit(self, request: Request) -> bool:
        """Give `request` a sequence id, its cached prefix and its reservation, if
        room can be made. On success its `seq_id`, `n_past`, `resident_prefix` and
        `pending` are set (and `cached_tokens`, on its first admission); on failure
        nothing changes and the request waits. A preempted request is admitted
        again the same way, with everything it sampled so far as its tokens."""
        share = self.tree_plan(request)
        self._lock(share.node)  # the matched path must survive the evictions below
        shifted = self.shifted_plan(request, share)
        if shifted is not None:
            self._lock(shifted.node)  # the original's holder too (compaction would spill it)
        if self._compact:
            self._spill_parked()
        own = self.spilled_plan(request, share) or shifted
        if shifted is not None and own is not shifted:
            self._unlock(shifted.node)
        chosen = next(
            (plan for plan in (own, share) if plan is not None and self._pool.reserve(request, plan.reserve_cells)),
            None,
        )
        if own is not None and not (chosen is own and own.source == "shifted"):
            self._unlock(own.node)  # (a shift take-over unlocks it itself)
        if chosen is None:
            self._unlock(share.node)
            if share.node is None or not self._pool.reserve(request, cells_to_reserve(request, 0)):
                return False
            # The last resort: a short shared prefix must not keep a large parked entry
            # locked in the pool when the request needs its room. Evaluate everything.
            chosen = share = AdmissionPlan("none", 0, cells_to_reserve(request, 0))
        if chosen is own and self._load_own(request, own):
            self._unlock(share.node)
        else:
            self._share(request, share)
        if not self._settle_reservation(request):
            return False
        request.n_past = request.resident_prefix
        request.pending = list(request.admission_tokens[request.resident_prefix :])
        if not request.preemptions:
            request.cached_tokens = request.resident_prefix
        return True

    def _lock(self, node: Node | None) -> None:
        if node is not None:
            assert self._pool.cache is not None  # nodes come from the cache
            self._pool.cache.lock(node)

    def _unlock(self, node: Node | None) -> None:
        if node is not None:
            assert self._pool.cache is not None
            self._pool.cache.unlock(node)

    # -- plans ---------------------------------------------------------------------------------

    def tree_plan(self, request: Request) -> AdmissionPlan:
        """Share the longest prefix the KV pool holds (``none`` if it holds nothing of it)."""
        cache = self._pool.cache
        if cache is not None:
            found = cache.match(request.admission_tokens, namespace=request.cache_key)
            usable = usable_prefix(request, found.length)
            if usable:
                return AdmissionPlan(
                    "tree", usable, cells_to_reserve(request, usable), node=found.node, source_tokens=usable
                )
        return AdmissionPlan("none", 0, cells_to_reserve(request, 0))

    def spilled_plan(self, request: Request, share: AdmissionPlan) -> AdmissionPlan | None:
        """Restore spilled state if it covers `MIN_RESTORE_GAIN` more tokens than `share`."""
        store = self._pool.store
        if store is None:
            return None
        found = store.best_match(request.admission_tokens, namespace=request.cache_key)
        if found is None:
            return None
        usable = usable_prefix(request, found.length)
        if usable < share.prefix_tokens + MIN_RESTORE_GAIN:
            return None
        # Restored cells are the request's own, so it reserves the whole prompt; while the
        # state loads, the sequence holds all of the entry's tokens, however many.
        reserve = max(cells_to_reserve(request, 0), len(found.entry_tokens))
        return AdmissionPlan("spilled", usable, reserve, source_tokens=found.length, spilled=found)

    def shifted_plan(self, request: Request, share: AdmissionPlan) -> AdmissionPlan | None:
        """For a shifted prompt: take over the original's cached cells, if they reach
        past the cut and give `MIN_RESTORE_GAIN` more tokens than `share`."""
        shift, cache = request.shift, self._pool.cache
        if shift is None or cache is None or request.preemptions:  # resumed: its own KV is in the tree
            return None
        found = cache.match(shift.original, namespace=request.original_cache_key)
        if found.length <= shift.n_keep + shift.n_drop:
            return None
        moved = usable_prefix(request, found.length - shift.n_drop)
        if moved < share.prefix_tokens + MIN_RESTORE_GAIN:
            return None
        # The moved cells are counted in the tree until the take-over, in the reservation after it.
        return AdmissionPlan(
            "shifted", moved, cells_to_reserve(request, moved), node=found.node, source_tokens=found.length
        )

    # -- carrying a plan out -------------------------------------------------------------------------

    def _settle_reservation(self, request: Request) -> bool:
        """Make the request's reservation what its prefix calls for (a fallback or a
        take-over can change it from the plan's). If the extra cells cannot be made
        room for, undo the admission (False): the request waits with nothing held."""
        pool = self._pool
        extra = cells_to_reserve(request, request.shared_prefix) - request.reserved_cells
        if extra > 0 and not pool.make_room(extra, need_id=False):
            seq_id = request.seq_id
            assert seq_id is not None
            pool.release(request)
            pool.free_id(seq_id)
            request.seq_id, request.resident_prefix, request.shared_prefix = None, 0, 0
            return False
        pool.grow_reservation(request, extra)
        return True

    def _share(self, request: Request, plan: AdmissionPlan) -> None:
        """Share the tree plan's cells (its node stays locked until the request ends)."""
        if plan.source != "tree":
            return
        assert plan.node is not None and plan.node.holder is not None and request.seq_id is not None
        self._pool.context.seq_copy(plan.node.holder, request.seq_id, 0, plan.prefix_tokens)
        request.locked_node = plan.node
        request.resident_prefix = request.shared_prefix = plan.prefix_tokens

    def _load_own(self, request: Request, plan: AdmissionPlan) -> bool:
        """Load a spilled or shifted prefix as the request's own cells (not shared with
        the tree: its reservation will cover them). False, with the request's
        sequence left empty, if that fails."""
        loaded = self._restore(request, plan) if plan.source == "spilled" else self._take_over(request, plan)
        if loaded:
            request.shared_prefix = 0
        return loaded

    def _restore(self, request: Request, plan: AdmissionPlan) -> bool:
        """Load spilled state into the request's (empty) sequence, trimmed to the prompt."""
        pool, seq_id = self._pool, request.seq_id
        assert plan.spilled is not None and pool.store is not None and seq_id is not None
        entry = pool.store.load(plan.spilled)
        if entry is not None:
            try:
                pool.context.set_seq_state(seq_id, entry.state)
                held = pool.context.seq_pos_max(seq_id) + 1
                if held != len(entry.tokens):  # a file whose header does not describe its state
                    raise BackendError(f"the state holds {held} positions, its entry {len(entry.tokens)}")
                pool.remove(seq_id, plan.prefix_tokens, -1)
            except BackendError:
                logger.warning("restoring %d cached tokens failed; evaluating them instead", plan.source_tokens)
                pool.remove(seq_id)
            else:
                request.resident_prefix = plan.prefix_tokens
                pool.counters.restores += 1
                return True
        pool.counters.restore_failures += 1
        return False

    def _take_over(self, request: Request, plan: AdmissionPlan) -> bool:
        """Move the original's cells into the request's sequence, drop the shift's cut,
        move the rest back.

        Positions are shifted in place, so the moved cells must belong to the request
        alone: the holder leaves the cache (its exact entry is spilled if a lower
        tier exists), and if other cached entries still share cells past the cut,
        only the kept head is reused.
        """
        pool, shift, target = self._pool, request.shift, request.seq_id
        cache = pool.cache
        assert shift is not None and cache is not None and target is not None and plan.node is not None
        holder, length = plan.node.holder, plan.source_tokens
        assert holder is not None
        pool.context.seq_copy(holder, target, 0, length)
        cache.unlock(plan.node)
        try:
            evictions = cache.evict_sequence(holder)
        except ValueError:  # a running request shares those cells: leave them alone
            pool.remove(target)
            return False
        for eviction in evictions:
            pool.evict(eviction)
        cut_end = shift.n_keep + shift.n_drop
        still_shared = cache.peek(shift.original[:length], namespace=request.original_cache_key).length
        if still_shared > cut_end:
            request.resident_prefix = usable_prefix(request, shift.n_keep)
            pool.remove(target, request.resident_prefix, -1)
            return True
        pool.remove(target, shift.n_keep, cut_end)
        pool.context.seq_shift(target, cut_end, length, -shift.n_drop)
        request.resident_prefix = plan.prefix_tokens
        pool.remove(target, request.resident_prefix, -1)
        pool.counters.shifts += 1
        return True

    # -- compaction ----------------------------------------------------------------------------------

    def _spill_parked(self) -> None:
        """Move unlocked parked entries to the RAM tier, least recently used first,
        while it has room for them (an entry that would push another out stays)."""
        cache = self._pool.cache
        if cache is None or self._pool.store is None:
            return
        while (leaf := cache.lru_leaf(COMPACT_MIN_TOKENS)) is not None and self._ram_fits(leaf.end):
            self._pool.evict(cache.evict_leaf(leaf))

    def _ram_fits(self, tokens: int) -> bool:
        store, per_token = self._pool.store, self._pool.state_bytes_per_token
        assert store is not None
        if per_token is None:  # size unknown until the first spill
            return store.ram_budget_bytes > 0 and store.ram_room_bytes == store.ram_budget_bytes
        return tokens * per_token <= store.ram_room_bytes
