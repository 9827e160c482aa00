"""`StateStore`: per-sequence KV states spilled out of the KV pool, in host RAM and on disk.

An entry evicted from llama.cpp's KV pool hands its sequence state bytes here: RAM
within a byte budget (LRU), then, if given a directory, disk (survives restarts). A
prompt sharing a longer prefix with a stored entry than with the KV pool can restore
it instead of recomputing it. This module never talks to llama.cpp.

Entries are found through a :class:`~kvchat.engine.state_index.StateIndex` (a
radix tree per namespace): a lookup costs the length of the query, not the
number of entries, so the engine thread can ask at every admission and eviction.

Tail entries: an entry evicted from under a prefix that stays in the KV pool
(a session's turns behind a prompt other sessions share) is spilled as a *tail*:
the state of its positions ``[start, len(tokens))`` only, a fraction of the whole
(`SpilledState.start`). It can be restored only onto a pool that still holds its
first `start` tokens (`best_match`'s `resident`). Tails are indexed apart from
whole entries, live in RAM only (one that leaves the RAM tier is dropped: a file
of it would outlive the prefix it needs) and never supersede a whole entry.

Disk format: one file ``<key>.kvstate`` per entry, of the kind
:data:`~kvchat.engine.state_file.CACHE_ENTRY` (its header adds the entry's
``namespace``).

Disk writes: the state bytes are handed over on the engine thread, but the file
is written (and fsynced) by one writer thread the store owns, through a queue
bounded in bytes (:data:`WRITE_QUEUE_BYTES`). An entry whose file is still
queued is indexed on the disk tier already and is served from its pending bytes;
removing it cancels the write (or deletes the file once written). A spill that
finds the queue full is dropped and counted (it is a cache): eviction never
waits for the disk. `flush_to_disk` (shutdown) waits for room instead, then for
every file; `close` waits for the queue and stops the writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvchat.atomic_file import FileWriter, leftover_temp_files, write_atomically
from kvchat.engine import state_file
from kvchat.engine.state_file import CACHE_ENTRY, StateFileError
from kvchat.engine.state_index import StateIndex

logger = logging.getLogger("kvchat.engine.state_store")

FILE_SUFFIX = ".kvstate"
MAX_CHAIN = 16
"""Most entries :meth:`StateStore.best_chain` puts together for one restore."""
WRITE_QUEUE_BYTES = 64 * 1024 * 1024
"""Default bound of file bytes waiting for the writer thread (one larger entry is let in alone)."""


@dataclass(frozen=True)
class SpilledState:
    """The KV state of one sequence holding `tokens` at positions ``[start, len(tokens))``.

    `namespace` is a tenant key (entries never match across namespaces); `state`
    is the opaque bytes of ``llama_state_seq_get_data``. `start` > 0 makes it a
    tail: restoring it needs the first `start` tokens from the KV pool.
    """

    tokens: tuple[int, ...]
    namespace: str | None
    state: bytes
    start: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "state", bytes(self.state))
        if not 0 <= self.start < len(self.tokens):
            raise ValueError(f"a state of {len(self.tokens)} tokens cannot start at position {self.start}")


@dataclass(frozen=True)
class StoreMatch:
    """The stored entry sharing the longest prefix (`length` tokens) with a query;
    its state starts at position `start` (a tail, if > 0)."""

    length: int
    entry_tokens: tuple[int, ...]
    tier: Literal["ram", "disk"]
    key: str
    start: int = 0


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of a :class:`StateStore`. Bytes are state bytes in RAM, file bytes on disk.

    Counters since construction: `spills_to_disk` files written, `dropped` entries
    discarded for lack of space (or a failed disk write), `loads` successful
    :meth:`StateStore.load` calls (either tier), `load_failures` disk files that
    could not be loaded, `write_queue_drops` spills dropped (also counted in
    `dropped`) because the writer's queue was full. `pending_writes` and
    `pending_write_bytes`: files queued for (or being written by) the writer thread.
    """

    ram_entries: int
    ram_bytes: int
    ram_tokens: int
    disk_entries: int
    disk_bytes: int
    disk_tokens: int
    spills_to_disk: int
    dropped: int
    loads: int
    load_failures: int
    write_queue_drops: int = 0
    pending_writes: int = 0
    pending_write_bytes: int = 0


@dataclass(eq=False)
class _Entry:
    key: str
    namespace: str | None
    tokens: tuple[int, ...]
    size: int  # RAM: state bytes; disk: file bytes
    last_used: int
    state: bytes | None = None  # RAM tier only
    tier: Literal["ram", "disk"] = "ram"
    job: _WriteJob | None = None  # disk tier: its file write, until the engine sees it done
    start: int = 0  # a tail's first position (tails stay in RAM)

    @property
    def state_tokens(self) -> int:
        """Positions the state holds."""
        return len(self.tokens) - self.start


@dataclass(eq=False)
class _WriteJob:
    """One file for the writer thread. `state` is None once the file is in place (or
    the write failed: `failed`); the flags change under the store's condition lock."""

    key: str
    path: Path
    header: bytes
    state: bytes | None
    size: int
    then_unlink: list[Path]  # superseded files, deleted once this one is written
    cancelled: bool = False
    done: bool = False
    failed: bool = False


def _rank(e: _Entry) -> tuple[int, int]:
    """Among entries sharing as long a prefix with a query: RAM over disk, then most recent."""
    return (e.tier == "ram", e.last_used)


def entry_key(layout_key: str, namespace: str | None, tokens: Sequence[int]) -> str:
    """The stable key of an entry: sha256 hex of its layout key, namespace and tokens."""
    blob = json.dumps([layout_key, namespace, list(tokens)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class StateStore:
    """RAM tier (byte budget, LRU) with an optional disk tier below it.

    Over `ram_budget_bytes` of state, the least-recently-used RAM entries move to
    `disk_dir` (or are dropped without one); over `disk_budget_bytes` of files
    (None: no limit; the engine's default is `EngineSettings.cache_disk_bytes`),
    the least-recently-used disk entries are deleted. Files of
    another `layout_key` (model sha256 + KV-relevant context settings) in the
    directory are foreign: never matched, loaded, counted or deleted. One process
    per directory. Not thread-safe: only the engine's worker thread calls it (files
    are written by a writer thread of its own, see the module docstring).
    `write_queue_bytes` bounds the bytes waiting for that thread; None writes on
    the caller's thread instead (no writer thread). `write_file` writes one file
    whole (default: :func:`~kvchat.atomic_file.write_atomically`; tests pass a
    slow, failing or dying one).
    """

    def __init__(
        self,
        *,
        ram_budget_bytes: int,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_budget_bytes: int | None = None,
        layout_key: str = "",
        write_queue_bytes: int | None = WRITE_QUEUE_BYTES,
        write_file: FileWriter = write_atomically,
    ) -> None:
        if not isinstance(ram_budget_bytes, int) or ram_budget_bytes < 0:
            raise ValueError("ram_budget_bytes must be an integer >= 0")
        if disk_budget_bytes is not None and (not isinstance(disk_budget_bytes, int) or disk_budget_bytes < 0):
            raise ValueError("disk_budget_bytes must be an integer >= 0 or None")
        if write_queue_bytes is not None and (not isinstance(write_queue_bytes, int) or write_queue_bytes < 0):
            raise ValueError("write_queue_bytes must be an integer >= 0 or None")
        self.write_queue_bytes = write_queue_bytes
        self.ram_budget_bytes = ram_budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.layout_key = layout_key
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self._write_atomically = write_file
        self._ram: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._disk: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._ram_bytes = 0
        self._disk_bytes = 0
        self._ram_tokens = 0
        self._disk_tokens = 0
        self._index: StateIndex[_Entry] = StateIndex(_rank)  # whole entries
        self._tails: StateIndex[_Entry] = StateIndex(_rank)  # tail entries
        self._clock = 0
        self._counts = dict.fromkeys(("dropped", "loads", "load_failures", "write_queue_drops"), 0)
        # The writer thread's side: everything below is guarded by `_cond`.
        self._cond = threading.Condition()
        self._jobs: deque[_WriteJob] = deque()
        self._queued_bytes = 0  # jobs queued or being written
        self._queued_jobs = 0
        self._files_written = 0
        self._failed: deque[_WriteJob] = deque()
        self._stopping = False
        self._writer: threading.Thread | None = None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._scan_disk()

    def put(self, entry: SpilledState) -> None:
        """Store `entry` as the newest RAM entry, spilling or dropping LRU entries over budget.

        Not stored if its tokens are a prefix of (or equal to) a stored entry's in
        the same namespace (that entry is touched instead); stored entries whose
        tokens are a strict prefix of it are removed. Disk failures are logged,
        never raised.
        """
        if not entry.tokens:
            raise ValueError("a spilled state must hold at least one token")
        self._reap()
        if entry.start:
            self._put_tail(entry)
            return
        extension, superseded = self._index.extension_and_prefixes(entry.tokens, entry.namespace)
        if extension is not None:
            self._touch(extension)
            return
        tail_extension, covered_tails = self._tails.extension_and_prefixes(entry.tokens, entry.namespace)
        if tail_extension is not None and tail_extension.tokens == entry.tokens:
            covered_tails.append(tail_extension)
        for tail in covered_tails:  # a whole state holds all a tail does, and needs no prefix
            self._remove(tail, delete_file=False)
        # Superseded files are deleted only once the new entry is stored (on disk:
        # by the writer, after its file): a crash while its file is written must
        # not lose the prefix that was saved.
        stale_files = [self._path(old.key) for old in superseded if old.key in self._disk]
        for old in superseded:
            self._remove(old, delete_file=False)
        self._store_new(
            _Entry(
                entry_key(self.layout_key, entry.namespace, entry.tokens),
                entry.namespace,
                entry.tokens,
                len(entry.state),
                self._tick(),
                entry.state,
            ),
            stale_files,
        )

    def _put_tail(self, entry: SpilledState) -> None:
        """`put` for a tail: not stored if a whole entry, or a tail starting no later,
        holds its tokens or more; replaces the tails it holds the same of or more."""
        whole, _ = self._index.extension_and_prefixes(entry.tokens, entry.namespace)
        extension, prefixes = self._tails.extension_and_prefixes(entry.tokens, entry.namespace)
        for covering in (whole, extension if extension is not None and extension.start <= entry.start else None):
            if covering is not None:
                self._touch(covering)
                return
        if extension is not None and extension.tokens == entry.tokens:
            prefixes.append(extension)
        for old in prefixes:
            if old.start >= entry.start:
                self._remove(old, delete_file=False)
        key = f"{entry_key(self.layout_key, entry.namespace, entry.tokens)}.{entry.start}"
        tail = _Entry(key, entry.namespace, entry.tokens, len(entry.state), self._tick(), entry.state)
        tail.start = entry.start
        self._store_new(tail, [])

    def _store_new(self, new: _Entry, stale_files: list[Path]) -> None:
        """Index a new entry in RAM (spilling LRU entries over budget) or straight on
        disk; `stale_files` are deleted once it is stored."""
        if self.ram_budget_bytes == 0 or new.size > self.ram_budget_bytes:
            self._demote(new, then_unlink=stale_files)
            return
        _unlink_all(stale_files)
        self._add(new, "ram")
        while self._ram_bytes > self.ram_budget_bytes:
            oldest = next(iter(self._ram.values()))
            self._remove(oldest, delete_file=False)
            self._demote(oldest)

    def best_match(
        self, tokens: Sequence[int], *, namespace: str | None = None, resident: int = 0
    ) -> StoreMatch | None:
        """The entry sharing the longest prefix with `tokens` (ties: RAM, then most
        recent; a whole entry over a tail), among the whole entries and the tails
        whose prefix the KV pool holds (those starting at most at `resident`, the
        tokens of `tokens` the pool holds) and which give tokens past it.

        None if no such entry of `namespace` shares at least one token. Reads no file.
        """
        self._reap()
        best = None
        if (found := self._index.longest_match(tokens, namespace)) is not None:
            length, e = found
            best = StoreMatch(length, e.tokens, e.tier, e.key)
        for length, e in self._tails.matches(tokens, namespace):  # longest first
            if best is not None and length <= best.length:
                break
            if e.start <= resident < length:
                return StoreMatch(length, e.tokens, e.tier, e.key, e.start)
        return best

    def best_chain(self, tokens: Sequence[int], *, namespace: str | None = None, resident: int = 0) -> list[StoreMatch]:
        """Entries that restore the longest prefix of `tokens` together, the one that
        reaches furthest first: each later one covers the tokens up to where the one
        before it starts, and the last starts at most at `resident` (see
        :meth:`best_match`). A branch evicted piece by piece (a session's turns, each
        a tail of the one before) comes back this way. Empty if nothing matches;
        at most `MAX_CHAIN` entries. Reads no file.
        """
        alone = self.best_match(tokens, namespace=namespace, resident=resident)
        chain: list[StoreMatch] = []
        query, best = tuple(tokens), alone
        while len(chain) < MAX_CHAIN:
            link, deeper = best, self._tails.longest_match(query, namespace)
            if deeper is not None:
                length, e = deeper
                if resident < e.start < length and length > (best.length if best else 0):
                    link = StoreMatch(length, e.tokens, e.tier, e.key, e.start)
            if link is None or (chain and link.length < len(query)):  # a gap before the last link's start
                break
            chain.append(link)
            if link.start <= resident:
                return chain
            query = query[: link.start]
            best = self.best_match(query, namespace=namespace, resident=resident)
        return [alone] if alone is not None else []

    def touch(self, match: StoreMatch) -> None:
        """Mark the entry of `match` as the most recently used, if it is still stored:
        a request about to load it makes room first, and the states that making room
        spills must push older entries out of the RAM tier, not this one."""
        self._reap()
        e = self._ram.get(match.key) or self._disk.get(match.key)
        if e is not None:
            self._touch(e)

    def load(self, match: StoreMatch) -> SpilledState | None:
        """The stored entry of `match`, read from RAM or disk and touched as recently used.

        The entry stays stored. None if it is gone, or if its file is missing,
        truncated, corrupt or foreign (logged at WARNING; the entry leaves the
        index, and a broken file of ours is deleted). Never raises for a bad file.
        An entry whose file is still queued for the writer is served from its bytes.
        """
        self._reap()
        if (e := self._ram.get(match.key)) is not None:
            self._touch(e)
            self._counts["loads"] += 1
            return SpilledState(e.tokens, e.namespace, e.state or b"", e.start)
        if (e := self._disk.get(match.key)) is None:
            logger.debug("entry %s is no longer stored", match.key)
            return None
        if e.job is not None and (pending := e.job.state) is not None:
            self._touch(e)
            self._counts["loads"] += 1
            return SpilledState(e.tokens, e.namespace, pending)
        path = self._path(e.key)
        try:
            state = self._read_file(path, load=True).state or b""
        except StateFileError as bad:
            logger.warning("cannot load spilled KV state %s: %s", path, bad)
            self._counts["load_failures"] += 1
            self._remove(e, delete_file=bad.problem in ("header", "data"))
            return None
        self._touch(e)
        self._counts["loads"] += 1
        return SpilledState(e.tokens, e.namespace, state)

    def stats(self) -> StoreStats:
        """Current sizes and counters."""
        self._reap()
        with self._cond:
            written, pending, pending_bytes = self._files_written, self._queued_jobs, self._queued_bytes
        return StoreStats(
            ram_entries=len(self._ram),
            ram_bytes=self._ram_bytes,
            ram_tokens=self._ram_tokens,
            disk_entries=len(self._disk),
            disk_bytes=self._disk_bytes,
            disk_tokens=self._disk_tokens,
            spills_to_disk=written,
            pending_writes=pending,
            pending_write_bytes=pending_bytes,
            **self._counts,
        )

    @property
    def ram_room_bytes(self) -> int:
        """Bytes the RAM tier can still take without moving or dropping an entry."""
        return max(0, self.ram_budget_bytes - self._ram_bytes)

    @property
    def has_disk(self) -> bool:
        """True when a disk tier is configured."""
        return self.disk_dir is not None

    def flush_to_disk(self) -> None:
        """Move every RAM entry to the disk tier (before shutdown), oldest first, and
        wait until every queued file is written (this waits for room in the writer's
        queue instead of dropping)."""
        if self.disk_dir is None:
            return
        self._reap()
        for entry in list(self._ram.values()):
            self._remove(entry, delete_file=False)
            self._demote(entry, wait=True)
        self.drain()

    def drain(self) -> None:
        """Wait until the writer thread has written (or given up on) every queued file."""
        with self._cond:
            while self._queued_jobs and self._writer is not None and self._writer.is_alive():
                self._cond.wait(0.1)
        self._reap()

    def close(self) -> None:
        """Wait for the queued files, then stop the writer thread. The store stays
        usable: a later spill starts a new writer."""
        self.drain()
        with self._cond:
            writer, self._stopping = self._writer, True
            self._cond.notify_all()
        if writer is not None:
            writer.join()
        with self._cond:
            self._writer, self._stopping = None, False

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @property
    def index_steps(self) -> int:
        """Index nodes the last lookup (`best_match` or `put`) visited, for tests: it does
        not grow with the number of stored entries that share no prefix with the query."""
        return self._index.steps + self._tails.steps

    def _touch(self, e: _Entry) -> None:
        e.last_used = self._tick()
        if e.key in self._ram:
            self._ram.move_to_end(e.key)
        elif e.key in self._disk:
            self._disk.move_to_end(e.key)
            with suppress(OSError):  # keeps the LRU order across restarts
                os.utime(self._path(e.key))
        self._index_of(e).touch(e)

    def _add(self, e: _Entry, tier: Literal["ram", "disk"]) -> None:
        """Index `e` in `tier` (its key is in neither tier)."""
        e.tier = tier
        if tier == "ram":
            self._ram[e.key] = e
            self._ram_bytes += e.size
            self._ram_tokens += e.state_tokens
        else:
            self._disk[e.key] = e
            self._disk_bytes += e.size
            self._disk_tokens += e.state_tokens
        self._index_of(e).add(e)

    def _index_of(self, e: _Entry) -> StateIndex[_Entry]:
        return self._tails if e.start else self._index

    def _remove(self, e: _Entry, *, delete_file: bool) -> None:
        if (held := self._ram.pop(e.key, None)) is not None:
            self._ram_bytes -= held.size
            self._ram_tokens -= held.state_tokens
        elif (held := self._disk.pop(e.key, None)) is not None:
            self._disk_bytes -= held.size
            self._disk_tokens -= held.state_tokens
            written = True
            if held.job is not None:
                with self._cond:  # the writer deletes a file it writes after this
                    held.job.cancelled = True
                    written = held.job.done
            if delete_file and written:
                with suppress(OSError):
                    os.unlink(self._path(e.key))
        if held is not None:
            self._index_of(held).remove(held)

    def _demote(self, e: _Entry, *, wait: bool = False, then_unlink: Sequence[Path] = ()) -> None:
        """Write a RAM entry (already out of the RAM index) to disk, or drop it; then
        delete `then_unlink` (after the new file, if it is written). With `wait`,
        wait for room in the writer's queue rather than drop."""
        stale = list(then_unlink)
        if self.disk_dir is None or e.state is None or e.start:
            self._drop(e, "a tail stays in RAM" if e.start else "no disk tier")
            _unlink_all(stale)
            return
        header = state_file.header_bytes(
            CACHE_ENTRY, layout_key=self.layout_key, tokens=e.tokens, state=e.state, namespace=e.namespace
        )
        file_size = len(header) + len(e.state)
        path = self._path(e.key)
        if self.write_queue_bytes is not None and not wait and not self._queue_has_room(file_size):
            self._counts["write_queue_drops"] += 1
            self._drop(e, "the disk writer's queue is full")
            _unlink_all(stale)
            return
        if self.disk_budget_bytes is not None:
            if file_size > self.disk_budget_bytes:
                self._drop(e, "larger than the disk budget")
                _unlink_all(stale)
                return
            while self._disk and self._disk_bytes + file_size > self.disk_budget_bytes:
                self._evict_oldest_disk_entry()
        job = None
        if self.write_queue_bytes is None:
            written = self._write_file(path, header, e.state)
            _unlink_all(stale)
            if not written:
                self._drop(e, "disk write failed")
                return
            with self._cond:
                self._files_written += 1
        else:
            job = _WriteJob(e.key, path, header, e.state, file_size, stale)
            self._enqueue(job, wait=wait)
        if (old := self._disk.get(e.key)) is not None:
            self._remove(old, delete_file=False)  # its file is (being) replaced
        self._add(_Entry(e.key, e.namespace, e.tokens, file_size, e.last_used, job=job), "disk")
        logger.debug("spilled %d tokens (%d bytes) to disk as %s", len(e.tokens), file_size, e.key)

    # -- the writer thread -------------------------------------------------------------

    def _queue_has_room(self, size: int) -> bool:
        """True if a file of `size` bytes fits in the writer's queue (one too large
        for the bound is let in when the queue is empty)."""
        assert self.write_queue_bytes is not None
        with self._cond:
            return self._queued_jobs == 0 or self._queued_bytes + size <= self.write_queue_bytes

    def _enqueue(self, job: _WriteJob, *, wait: bool) -> None:
        with self._cond:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="kvchat-state-writer", daemon=True)
                self._writer.start()
            while wait and not self._queue_has_room(job.size) and self._writer.is_alive():
                self._cond.wait(0.1)
            self._jobs.append(job)
            self._queued_jobs += 1
            self._queued_bytes += job.size
            self._cond.notify_all()

    def _write_loop(self) -> None:
        """The writer thread: write queued files in order until `close`."""
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs[0]  # stays counted (and drainable) until written
                skip = job.cancelled
            state = job.state
            written = not skip and state is not None and self._write_file(job.path, job.header, state)
            with self._cond:
                job.done, job.state, job.header = True, None, b""
                job.failed = not skip and not written
                remove_again = written and job.cancelled
            if remove_again:  # removed from the index while it was being written
                _unlink_all([job.path])
            _unlink_all(job.then_unlink)  # superseded by this entry, written or since removed
            if job.failed:
                self._failed.append(job)
            with self._cond:  # uncounted only now: `drain` returns after all of the above
                self._jobs.popleft()
                self._queued_jobs -= 1
                self._queued_bytes -= job.size
                self._files_written += written
                self._cond.notify_all()

    def _reap(self) -> None:
        """Unindex entries whose file the writer failed to write (engine thread)."""
        while self._failed:
            job = self._failed.popleft()
            if (e := self._disk.get(job.key)) is not None and e.job is job:
                self._remove(e, delete_file=False)
                self._drop(e, "disk write failed")

    def _evict_oldest_disk_entry(self) -> None:
        oldest = next(iter(self._disk.values()))
        self._remove(oldest, delete_file=True)
        self._drop(oldest, "disk budget")

    def _drop(self, e: _Entry, why: str) -> None:
        """Count and log an entry lost for lack of space (the caller unindexed it)."""
        self._counts["dropped"] += 1
        logger.debug("dropped spilled state of %d tokens (%s)", len(e.tokens), why)

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}{FILE_SUFFIX}"

    def _write_file(self, path: Path, header: bytes, state: bytes) -> bool:
        """Write atomically; False, logged, on an OS error."""
        try:
            self._write_atomically(path, header, state)
        except OSError as exc:
            logger.warning("cannot write spilled KV state %s: %s", path, exc)
            return False
        return True

    def _scan_disk(self) -> None:
        """Index our files by reading their headers only, least recently modified first."""
        assert self.disk_dir is not None
        found: list[tuple[float, _Entry]] = []
        foreign = 0
        for path in leftover_temp_files(self.disk_dir, FILE_SUFFIX):
            logger.info("removing leftover temporary file %s", path)
            with suppress(OSError):
                path.unlink()
        for path in self.disk_dir.glob(f"*{FILE_SUFFIX}"):
            try:
                read = self._read_file(path, load=False)
            except StateFileError as bad:
                foreign += bad.problem == "foreign"
                if bad.problem != "foreign":
                    logger.warning("skipping spilled KV state file %s: %s", path, bad)
                if bad.problem == "data":  # ours (the layout_key checks out) but partial
                    with suppress(OSError):
                        path.unlink()
                continue
            entry = _Entry(path.stem, read.header["namespace"], read.tokens, read.file_size, 0)
            found.append((read.mtime, entry))
        if foreign:
            logger.info("ignoring %d spilled KV state file(s) of another model or layout in %s", foreign, self.disk_dir)
        for _, e in sorted(found, key=lambda item: item[0]):
            e.last_used = self._tick()
            self._add(e, "disk")
        while self.disk_budget_bytes is not None and self._disk_bytes > self.disk_budget_bytes:
            self._evict_oldest_disk_entry()

    def _read_file(self, path: Path, *, load: bool) -> state_file.StateFile:
        """One of our files, checked (its state verified if `load`); else `StateFileError`."""
        read = state_file.read(path, CACHE_ENTRY, layout_key=self.layout_key, load=load)
        if not read.tokens:
            raise StateFileError("an entry without tokens", "header")
        if entry_key(self.layout_key, read.header["namespace"], read.tokens) != path.stem:
            raise StateFileError("file name does not match its header", "header")
        return read


def _unlink_all(paths: Sequence[Path]) -> None:
    for path in paths:
        with suppress(OSError):
            os.unlink(path)
