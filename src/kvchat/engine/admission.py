"""`Admission`: where a new request's cached prefix comes from, and room for it.

Admitting a request is two steps. First a plain :class:`AdmissionPlan` is made
for each source that can give the prompt's prefix:

- ``tree``: cells shared from a parked sequence of the prefix cache (no copy);
- ``spilled``: state spilled to the RAM or disk tier, loaded into the request's
  own sequence (when it covers at least `MIN_RESTORE_GAIN` more tokens); a tail
  (state past a prefix other entries shared when it was spilled) loads after that
  prefix, shared from the tree;
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
(benchmarks/pool_compaction.py). It stops at an entry that mostly shares its
cells with other entries (`OWN_SHARE_TO_COMPACT`), or whose state would take more
than an eighth of the tier (`COMPACT_MAX_TIER_SHARE`). Coding agents' sessions
are both: a short tail behind a prompt of 9-12k tokens that the client's sessions
share. Spilled, such a state pushes the others out of the tier and comes back as
a copy that shares no cells, so every later call evaluated its session's whole
tail again (benchmarks/coding_agents.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, TypeGuard

from kvchat.engine.kv_pool import KVPool
from kvchat.engine.prefix_cache import Node, PrefixCache
from kvchat.engine.request import Request
from kvchat.engine.state_store import SpilledState
from kvchat.errors import BackendError

logger = logging.getLogger("kvchat.engine")

MIN_RESTORE_GAIN = 16
"""Restore spilled state only when it covers this many more tokens than the KV
pool does: below that, evaluating the tokens is as cheap as copying the state."""

COMPACT_MIN_TOKENS = 4 * MIN_RESTORE_GAIN
"""Pool compaction leaves shorter parked entries in the pool: they cost little
attention time, and a restore of them would rarely pay (`MIN_RESTORE_GAIN`)."""

COMPACT_MAX_TIER_SHARE = 0.125
"""Pool compaction spills a parked entry only if its state takes at most this share of
the RAM tier's budget. A longer one (a coding agent's 9-12k-token prompt is 40-60% of
the default 256 MiB on Qwen 0.5B) would soon push other spilled entries out, and its
restored copy would share no cells with the entries that share its prefix."""

OWN_SHARE_TO_COMPACT = 0.5
"""Pool compaction spills a parked entry only if at least this share of its state is
cells that no other entry shares (:meth:`PrefixCache.own_tokens`)."""

PrefixSource = Literal["none", "tree", "spilled", "shifted"]


@dataclass(frozen=True)
class AdmissionPlan:
    """How one request gets its KV sequence.

    `prefix_tokens` prompt tokens come from `source`; the request reserves
    `reserve_cells` cells at admission. `node` is the tree node the tokens come
    from (``tree`` and ``shifted``; for ``spilled``, the node whose holder gives
    a tail's prefix): it stays locked while the plan may still be
    carried out, and its holder is read only then (making room evicts other
    entries, which can hand the node to another holder). `source_tokens` is how
    many positions of the holder are taken (``shifted``: before the cut),
    `spilled` the stored entries, read from their tier (``spilled``: the one that
    reaches furthest first, each later one up to where the one before starts; see
    :meth:`~kvchat.engine.state_store.StateStore.best_chain`).
    """

    source: PrefixSource
    prefix_tokens: int
    reserve_cells: int
    node: Node | None = None
    source_tokens: int = 0
    spilled: tuple[SpilledState, ...] = ()


def cells_to_reserve(request: Request, prefix_tokens: int) -> int:
    """Cells a request holds back at admission when `prefix_tokens` of its tokens
    are not its own new cells: the rest of its tokens, and room for what it
    generates until its reservation next grows (`Request.decode_cells`)."""
    return len(request.admission_tokens) - prefix_tokens + request.decode_cells()


def usable_prefix(request: Request, matched: int) -> int:
    """A match's usable length: at least one token is evaluated, for fresh logits."""
    return max(0, min(matched, len(request.admission_tokens) - 1))


def all_loaded(entries: tuple[SpilledState | None, ...]) -> TypeGuard[tuple[SpilledState, ...]]:
    """Whether every entry could be read from its tier."""
    return all(e is not None for e in entries)


class Admission:
    """Admits waiting requests into a :class:`KVPool` (worker thread only)."""

    def __init__(self, pool: KVPool, *, compact: bool) -> None:
        self._pool = pool
        self._compact = compact

    def admit(self, request: Request) -> bool:
        """Give `request` a sequence id, its cached prefix and its reservation, if
        room can be made. On success its sequence is placed in the pool (`n_past`,
        `resident_prefix`) and its `pending` tokens set (and `cached_tokens`, on
        its first admission); on failure nothing changes and the request waits. A
        preempted request is admitted again the same way, with everything it
        sampled so far as its tokens.

        Plan, reserve, execute: the plans' tree nodes are held by leases while they
        are made and carried out (so the evictions that make room leave them), and
        each lease not handed to the request ends with the admission.
        """
        with Leases(self._pool.cache) as leases:
            share = self.tree_plan(request)
            leases.hold(share.node)
            shifted = self.shifted_plan(request, share)
            if shifted is not None:
                leases.hold(shifted.node)  # the original's holder too (compaction would spill it)
            if self._compact:
                self._spill_parked()
            own = self.spilled_plan(request, share) or shifted
            if shifted is not None and own is not shifted:
                leases.release(shifted.node)
            for plan in self._in_order(request, own, share):
                if plan.source == "none" and share.node is not None:
                    # The last resort: a short shared prefix must not keep a large parked
                    # entry locked in the pool when the request needs its room.
                    leases.release(share.node)
                if self._pool.reserve(request, plan.reserve_cells):
                    leases.keep_only(plan.node, share.node)
                    self._execute(request, plan, share, leases)
                    break
            else:
                return False
        if not self._settle_reservation(request):
            return False
        request.pending = list(request.admission_tokens[request.resident_prefix :])
        if not request.preemptions:
            request.cached_tokens = request.resident_prefix
        return True

    @staticmethod
    def _in_order(request: Request, own: AdmissionPlan | None, share: AdmissionPlan) -> list[AdmissionPlan]:
        """The plans to try, best first: the request's own cells (spilled or
        shifted), the tree's, and evaluating everything if the tree's shares a prefix."""
        plans = [own] if own is not None else []
        plans.append(share)
        if share.node is not None:
            plans.append(AdmissionPlan("none", 0, cells_to_reserve(request, 0)))
        return plans

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
        chain = store.best_chain(request.admission_tokens, namespace=request.cache_key, resident=share.prefix_tokens)
        if not chain:
            return None
        usable = usable_prefix(request, chain[0].length)
        if usable < share.prefix_tokens + MIN_RESTORE_GAIN:
            return None
        # Read now (and touched): the evictions that make room for them spill other
        # states, which could push these out of the tier before they are loaded.
        entries = tuple(store.load(found) for found in chain)
        if not all_loaded(entries):
            self._pool.counters.restore_failures += 1
            return None
        # Restored cells are the request's own (the prefix before the last entry's start is
        # shared from the tree plan's node), so it reserves the rest of the prompt; while
        # the states load, its sequence holds all of their tokens, however many.
        start = entries[-1].start
        reserve = max(cells_to_reserve(request, start), sum(len(e.tokens) - e.start for e in entries))
        node = share.node if start else None
        return AdmissionPlan("spilled", usable, reserve, node=node, source_tokens=chain[0].length, spilled=entries)

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

    def _execute(self, request: Request, plan: AdmissionPlan, share: AdmissionPlan, leases: Leases) -> None:
        """Place the request's prefix as `plan` says (its cells reserved). Loading
        its own cells (spilled or shifted) may fail: then it shares the tree plan's."""
        if plan.source == "spilled":
            resident = self._restore(request, plan)
            if resident is not None:
                if start := plan.spilled[-1].start:  # tails on the tree's prefix: the request shares that
                    assert plan.node is not None
                    node = leases.hand_over(plan.node)
                    self._pool.place(request, resident=resident, shared=start, node=node)
                else:
                    self._pool.place(request, resident=resident)
                return
            plan = share
        elif plan.source == "shifted":
            assert plan.node is not None
            resident = self._take_over(request, plan, leases.hand_over(plan.node))
            if resident is not None:
                self._pool.place(request, resident=resident)
                return
            plan = share
        if plan.source == "tree":
            assert plan.node is not None
            self._pool.share_prefix(request, leases.hand_over(plan.node), plan.prefix_tokens)
        else:
            self._pool.place(request, resident=0)

    def _settle_reservation(self, request: Request) -> bool:
        """Make the request's reservation what its prefix calls for (a fallback or a
        take-over can change it from the plan's). If the extra cells cannot be made
        room for, undo the admission (False): the request waits with nothing held."""
        pool = self._pool
        extra = cells_to_reserve(request, request.shared_prefix) - request.reserved_cells
        if extra > 0 and not pool.make_room(extra, need_id=False):
            pool.undo_admission(request)
            return False
        pool.grow_reservation(request, extra)
        return True

    def _restore(self, request: Request, plan: AdmissionPlan) -> int | None:
        """Load spilled state into the request's (empty) sequence (a tail after the
        tree's prefix, shared from `plan.node`'s holder), trimmed to the prompt; the
        tokens it holds then, or None (its sequence left empty)."""
        pool, seq_id, entries = self._pool, request.seq_id, plan.spilled
        assert entries and seq_id is not None
        try:
            for i, entry in enumerate(entries):
                if i == 0:
                    held = pool.load_state(seq_id, entry.state)
                else:  # up to where the entry before it starts
                    held = pool.load_state_part(seq_id, entry.state, entry.start, entries[i - 1].start)
                if held != len(entry.tokens):  # a file whose header does not describe its state
                    raise BackendError(f"the state holds {held} positions, its entry {len(entry.tokens)}")
            if (start := entries[-1].start) > 0:
                assert plan.node is not None and plan.node.holder is not None
                pool.copy_cells(plan.node.holder, seq_id, 0, start)
            pool.remove(seq_id, plan.prefix_tokens, -1)
        except BackendError:
            logger.warning("restoring %d cached tokens failed; evaluating them instead", plan.source_tokens)
            pool.remove(seq_id)
            pool.counters.restore_failures += 1
            return None
        pool.counters.restores += 1
        return plan.prefix_tokens

    def _take_over(self, request: Request, plan: AdmissionPlan, node: Node) -> int | None:
        """Move the original's cells (held by `node`'s holder, whose lock is handed to
        this method) into the request's sequence, drop the shift's cut, move the rest
        back; the tokens it holds then, or None (its sequence left empty).

        Positions are shifted in place, so the moved cells must belong to the request
        alone: the holder leaves the cache (its exact entry is spilled if a lower
        tier exists), and if other cached entries still share cells past the cut,
        only the kept head is reused.
        """
        pool, shift, target = self._pool, request.shift, request.seq_id
        cache = pool.cache
        assert shift is not None and cache is not None and target is not None
        holder, length = node.holder, plan.source_tokens
        assert holder is not None
        pool.copy_cells(holder, target, 0, length)
        cache.unlock(node)
        try:
            evictions = cache.evict_sequence(holder)
        except ValueError:  # a running request shares those cells: leave them alone
            pool.remove(target)
            return None
        for eviction in evictions:
            pool.evict(eviction)
        cut_end = shift.n_keep + shift.n_drop
        still_shared = cache.peek(shift.original[:length], namespace=request.original_cache_key).length
        if still_shared > cut_end:
            resident = usable_prefix(request, shift.n_keep)
            pool.remove(target, resident, -1)
            return resident
        pool.remove(target, shift.n_keep, cut_end)
        pool.shift_cells(target, cut_end, length, -shift.n_drop)
        pool.remove(target, plan.prefix_tokens, -1)
        pool.counters.shifts += 1
        return plan.prefix_tokens

    # -- compaction ----------------------------------------------------------------------------------

    def _spill_parked(self) -> None:
        """Move unlocked parked entries to the RAM tier, least recently used first,
        while each has room there (an entry that would push another out stays), is
        mostly its own cells and is small for the tier; the first that is not stays,
        and so do the younger ones."""
        cache, store = self._pool.cache, self._pool.store
        if cache is None or store is None or store.ram_budget_bytes == 0:
            return
        while (leaf := cache.lru_leaf(COMPACT_MIN_TOKENS)) is not None:
            assert leaf.holder is not None
            state_bytes = leaf.end * self._pool.measure_state_size(leaf.holder, leaf.end)
            if (
                state_bytes > store.ram_room_bytes
                or state_bytes > COMPACT_MAX_TIER_SHARE * store.ram_budget_bytes
                or cache.own_tokens(leaf) < OWN_SHARE_TO_COMPACT * leaf.end
            ):
                return
            self._pool.evict(cache.evict_leaf(leaf))


class Leases:
    """Locks on tree nodes held while an admission is planned and carried out.

    :meth:`hold` locks a node; :meth:`hand_over` passes a held lock on to its new
    owner (the request, or a take-over that unlocks it itself); every lock still
    held when the `with` block ends is released.
    """

    def __init__(self, cache: PrefixCache | None) -> None:
        self._cache = cache
        self._held: list[Node] = []

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self._held:
            self._unlock(node)
        self._held.clear()

    def hold(self, node: Node | None) -> None:
        """Lock `node` (None: nothing) until released or handed over."""
        if node is not None:
            assert self._cache is not None  # nodes come from the cache
            self._cache.lock(node)
            self._held.append(node)

    def release(self, node: Node | None) -> None:
        """Unlock one held lease on `node` now."""
        if node is not None and node in self._held:
            self._held.remove(node)
            self._unlock(node)

    def keep_only(self, *nodes: Node | None) -> None:
        """Release every lease but one each on `nodes`."""
        wanted = [n for n in nodes if n is not None]
        kept: list[Node] = []
        for node in self._held:
            if node in wanted:
                wanted.remove(node)
                kept.append(node)
            else:
                self._unlock(node)
        self._held = kept

    def hand_over(self, node: Node) -> Node:
        """Take one held lease on `node` out of this set: its lock is now the caller's."""
        self._held.remove(node)
        return node

    def _unlock(self, node: Node) -> None:
        assert self._cache is not None
        self._cache.unlock(node)
