"""`StateStore`: per-sequence KV states spilled out of the KV pool, in host RAM and on disk.

An entry evicted from llama.cpp's KV pool hands its sequence state bytes here: RAM
within a byte budget (LRU), then, if given a directory, disk (survives restarts). A
prompt sharing a longer prefix with a stored entry than with the KV pool can restore
it instead of recomputing it. This module never talks to llama.cpp.

Disk format, one file ``<key>.kvstate`` per entry: ``MAGIC``, then ``<HI``
(format version, JSON header length), the UTF-8 JSON header ``{"layout_key",
"namespace", "tokens", "state_size", "state_sha256"}``, then the state bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

logger = logging.getLogger("kvchat.engine.state_store")

MAGIC = b"KVCHAT-STATE\x00"
FORMAT_VERSION = 1
FILE_SUFFIX = ".kvstate"
TEMP_PREFIX = ".kvstate-"
TEMP_SUFFIX = ".tmp"
_FIXED = struct.Struct("<HI")  # format version, JSON header length
_MAX_HEADER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SpilledState:
    """The KV state of one sequence holding `tokens` at positions ``[0, len(tokens))``.

    `namespace` is a tenant key (entries never match across namespaces); `state`
    is the opaque bytes of ``llama_state_seq_get_data``.
    """

    tokens: tuple[int, ...]
    namespace: str | None
    state: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "state", bytes(self.state))


@dataclass(frozen=True)
class StoreMatch:
    """The stored entry sharing the longest prefix (`length` tokens) with a query."""

    length: int
    entry_tokens: tuple[int, ...]
    tier: Literal["ram", "disk"]
    key: str


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of a :class:`StateStore`. Bytes are state bytes in RAM, file bytes on disk.

    Counters since construction: `spills_to_disk` files written, `dropped` entries
    discarded for lack of space (or a failed disk write), `loads` successful
    :meth:`StateStore.take` calls (either tier), `load_failures` disk files that
    could not be loaded.
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


@dataclass(eq=False)
class _Entry:
    key: str
    namespace: str | None
    tokens: tuple[int, ...]
    size: int  # RAM: state bytes; disk: file bytes
    last_used: int
    state: bytes | None = None  # RAM tier only


class _BadFile(Exception):
    """A state file that cannot be used. `kind`: "io" (missing or unreadable), "foreign"
    (another layout_key), "header" (bad magic or header), "data" (our header, bad state)."""

    def __init__(self, reason: str, kind: Literal["io", "foreign", "header", "data"]) -> None:
        super().__init__(reason)
        self.kind = kind


def entry_key(layout_key: str, namespace: str | None, tokens: Sequence[int]) -> str:
    """The stable key of an entry: sha256 hex of its layout key, namespace and tokens."""
    blob = json.dumps([layout_key, namespace, list(tokens)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class StateStore:
    """RAM tier (byte budget, LRU) with an optional disk tier below it.

    Over `ram_budget_bytes` of state, the least-recently-used RAM entries move to
    `disk_dir` (or are dropped without one); over `disk_budget_bytes` of files
    (None: no limit), the least-recently-used disk entries are deleted. Files of
    another `layout_key` (model sha256 + KV-relevant context settings) in the
    directory are foreign: never matched, loaded, counted or deleted. One process
    per directory. Not thread-safe: only the engine's worker thread calls it.
    """

    def __init__(self, *, ram_budget_bytes: int, disk_dir: str | os.PathLike[str] | None = None,
                 disk_budget_bytes: int | None = None, layout_key: str = "") -> None:
        if not isinstance(ram_budget_bytes, int) or ram_budget_bytes < 0:
            raise ValueError("ram_budget_bytes must be an integer >= 0")
        if disk_budget_bytes is not None and (not isinstance(disk_budget_bytes, int) or disk_budget_bytes < 0):
            raise ValueError("disk_budget_bytes must be an integer >= 0 or None")
        self.ram_budget_bytes = ram_budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.layout_key = layout_key
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self._ram: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._disk: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._ram_bytes = 0
        self._disk_bytes = 0
        self._clock = 0
        self._counts = dict.fromkeys(("spills_to_disk", "dropped", "loads", "load_failures"), 0)
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
        n = len(entry.tokens)
        superseded: list[_Entry] = []
        for tier in (self._ram, self._disk):
            for old in list(tier.values()):
                if old.namespace != entry.namespace:
                    continue
                if len(old.tokens) >= n and old.tokens[:n] == entry.tokens:
                    self._touch(old)
                    return
                if old.tokens == entry.tokens[: len(old.tokens)]:
                    superseded.append(old)
        # Superseded files are deleted only once the new entry is stored: a crash
        # while its file is written must not lose the prefix that was saved.
        stale_files = [self._path(old.key) for old in superseded if old.key in self._disk]
        for old in superseded:
            self._remove(old, delete_file=False)
        self._store_new(_Entry(entry_key(self.layout_key, entry.namespace, entry.tokens), entry.namespace,
                               entry.tokens, len(entry.state), self._tick(), entry.state))
        for path in stale_files:
            with suppress(OSError):
                os.unlink(path)

    def _store_new(self, new: _Entry) -> None:
        """Index a new entry in RAM (spilling LRU entries over budget) or straight on disk."""
        if self.ram_budget_bytes == 0 or new.size > self.ram_budget_bytes:
            self._demote(new)
            return
        self._ram[new.key] = new
        self._ram_bytes += new.size
        while self._ram_bytes > self.ram_budget_bytes:
            oldest = next(iter(self._ram.values()))
            self._remove(oldest, delete_file=False)
            self._demote(oldest)

    def best_match(self, tokens: Sequence[int], *, namespace: str | None = None) -> StoreMatch | None:
        """The entry sharing the longest prefix with `tokens` (ties: RAM, then most recent).

        None if no entry of `namespace` shares at least one token. Reads no file.
        """
        query = tuple(tokens)
        if not query:
            return None
        best: tuple[int, bool, int] | None = None
        found: StoreMatch | None = None
        tiers: tuple[tuple[Literal["ram", "disk"], OrderedDict[str, _Entry]], ...] = (
            ("ram", self._ram), ("disk", self._disk))
        for tier_name, tier in tiers:
            for e in tier.values():
                if e.namespace != namespace or e.tokens[0] != query[0]:
                    continue
                rank = (_common_prefix_len(e.tokens, query), tier_name == "ram", e.last_used)
                if best is None or rank > best:
                    best = rank
                    found = StoreMatch(rank[0], e.tokens, tier_name, e.key)
        return found

    def take(self, match: StoreMatch) -> SpilledState | None:
        """The stored entry of `match`, loaded from RAM or disk and touched as recently used.

        The entry stays stored. None if it is gone, or if its file is missing,
        truncated, corrupt or foreign (logged at WARNING; the entry leaves the
        index, and a broken file of ours is deleted). Never raises for a bad file.
        """
        if (e := self._ram.get(match.key)) is not None:
            self._touch(e)
            self._counts["loads"] += 1
            return SpilledState(e.tokens, e.namespace, e.state or b"")
        if (e := self._disk.get(match.key)) is None:
            logger.debug("entry %s is no longer stored", match.key)
            return None
        path = self._path(e.key)
        try:
            state = self._read_file(path, load=True)[3] or b""
        except _BadFile as bad:
            logger.warning("cannot load spilled KV state %s: %s", path, bad)
            self._counts["load_failures"] += 1
            self._remove(e, delete_file=bad.kind in ("header", "data"))
            return None
        self._touch(e)
        self._counts["loads"] += 1
        return SpilledState(e.tokens, e.namespace, state)

    def stats(self) -> StoreStats:
        """Current sizes and counters."""
        return StoreStats(
            ram_entries=len(self._ram),
            ram_bytes=self._ram_bytes,
            ram_tokens=sum(len(e.tokens) for e in self._ram.values()),
            disk_entries=len(self._disk),
            disk_bytes=self._disk_bytes,
            disk_tokens=sum(len(e.tokens) for e in self._disk.values()),
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
        """Move every RAM entry to the disk tier (before shutdown), oldest first."""
        if self.disk_dir is None:
            return
        for entry in list(self._ram.values()):
            self._remove(entry, delete_file=False)
            self._demote(entry)

    def clear(self) -> None:
        """Forget every RAM entry; disk files stay (they survive restarts)."""
        self._ram.clear()
        self._ram_bytes = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, e: _Entry) -> None:
        e.last_used = self._tick()
        if e.key in self._ram:
            self._ram.move_to_end(e.key)
        elif e.key in self._disk:
            self._disk.move_to_end(e.key)
            with suppress(OSError):  # keeps the LRU order across restarts
                os.utime(self._path(e.key))

    def _remove(self, e: _Entry, *, delete_file: bool) -> None:
        if self._ram.pop(e.key, None) is not None:
            self._ram_bytes -= e.size
        elif self._disk.pop(e.key, None) is not None:
            self._disk_bytes -= e.size
            if delete_file:
                with suppress(OSError):
                    os.unlink(self._path(e.key))

    def _demote(self, e: _Entry) -> None:
        """Write a RAM entry (already out of the RAM index) to disk, or drop it."""
        if self.disk_dir is None or e.state is None:
            self._drop(e, "no disk tier")
            return
        header = _header_bytes(self.layout_key, e.namespace, e.tokens, e.state)
        file_size = len(header) + len(e.state)
        if self.disk_budget_bytes is not None:
            if file_size > self.disk_budget_bytes:
                self._drop(e, "larger than the disk budget")
                return
            while self._disk and self._disk_bytes + file_size > self.disk_budget_bytes:
                self._evict_oldest_disk_entry()
        if not self._write_file(self._path(e.key), header, e.state):
            self._drop(e, "disk write failed")
            return
        if (old := self._disk.pop(e.key, None)) is not None:
            self._disk_bytes -= old.size
        self._disk[e.key] = _Entry(e.key, e.namespace, e.tokens, file_size, e.last_used)
        self._disk_bytes += file_size
        self._counts["spills_to_disk"] += 1
        logger.debug("spilled %d tokens (%d bytes) to disk as %s", len(e.tokens), file_size, e.key)

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
        """Write atomically (temp file, fsync, rename); False, logged, on an OS error."""
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(state)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                with suppress(OSError):
                    os.unlink(tmp)
            if not isinstance(exc, OSError):
                raise
            logger.warning("cannot write spilled KV state %s: %s", path, exc)
            return False
        with suppress(OSError):  # make the rename durable (POSIX)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    def _scan_disk(self) -> None:
        """Index our files by reading their headers only, least recently modified first."""
        assert self.disk_dir is not None
        found: list[tuple[float, _Entry]] = []
        foreign = 0
        for path in self.disk_dir.iterdir():
            if path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX):
                logger.info("removing leftover temporary file %s", path)
                with suppress(OSError):
                    path.unlink()
            elif path.name.endswith(FILE_SUFFIX):
                try:
                    header, file_size, mtime, _ = self._read_file(path, load=False)
                except _BadFile as bad:
                    foreign += bad.kind == "foreign"
                    if bad.kind != "foreign":
                        logger.warning("skipping spilled KV state file %s: %s", path, bad)
                    if bad.kind == "data":  # ours (layout_key and name check out) but partial
                        with suppress(OSError):
                            path.unlink()
                    continue
                entry = _Entry(path.stem, header["namespace"], tuple(header["tokens"]), file_size, 0)
                found.append((mtime, entry))
        if foreign:
            logger.info("ignoring %d spilled KV state file(s) of another model or layout in %s",
                        foreign, self.disk_dir)
        for _, e in sorted(found, key=lambda item: item[0]):
            e.last_used = self._tick()
            self._disk[e.key] = e
            self._disk_bytes += e.size
        while self.disk_budget_bytes is not None and self._disk_bytes > self.disk_budget_bytes:
            self._evict_oldest_disk_entry()

    def _read_file(self, path: Path, *, load: bool) -> tuple[dict, int, float, bytes | None]:
        """Header, file size, mtime and (if `load`) verified state of one of our files, else `_BadFile`."""
        try:
            with open(path, "rb") as f:
                header, offset = _read_header(f)
                st = os.fstat(f.fileno())
                state = f.read(header["state_size"]) if load else None
        except FileNotFoundError as exc:
            raise _BadFile("file is missing", "io") from exc
        except OSError as exc:
            raise _BadFile(f"unreadable ({exc})", "io") from exc
        if header["layout_key"] != self.layout_key:
            raise _BadFile("foreign file (another model or KV layout)", "foreign")
        if entry_key(self.layout_key, header["namespace"], header["tokens"]) != path.stem:
            raise _BadFile("file name does not match its header", "header")
        expected = offset + header["state_size"]
        if st.st_size != expected:
            raise _BadFile(f"file is {st.st_size} bytes, expected {expected} (truncated or partial)", "data")
        if state is not None and (len(state) != header["state_size"]
                                  or hashlib.sha256(state).hexdigest() != header["state_sha256"]):
            raise _BadFile("checksum mismatch (corrupt state)", "data")
        return header, st.st_size, st.st_mtime, state


def _header_bytes(layout_key: str, namespace: str | None, tokens: tuple[int, ...], state: bytes) -> bytes:
    header = {"layout_key": layout_key, "namespace": namespace, "tokens": list(tokens),
              "state_size": len(state), "state_sha256": hashlib.sha256(state).hexdigest()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + _FIXED.pack(FORMAT_VERSION, len(raw)) + raw


def _read_header(f: BinaryIO) -> tuple[dict, int]:
    """The JSON header of a state file and the offset of its state bytes; `_BadFile` if unusable."""
    fixed = f.read(len(MAGIC) + _FIXED.size)
    if len(fixed) < len(MAGIC) + _FIXED.size or not fixed.startswith(MAGIC):
        raise _BadFile("bad magic bytes (not a kvchat state file)", "header")
    version, length = _FIXED.unpack_from(fixed, len(MAGIC))
    if version != FORMAT_VERSION:
        raise _BadFile(f"unsupported format version {version}", "header")
    if length > _MAX_HEADER_BYTES:
        raise _BadFile(f"header length {length} is implausible", "header")
    raw = f.read(length)
    if len(raw) != length:
        raise _BadFile("truncated header", "header")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _BadFile("header is not valid JSON", "header") from exc
    if not _header_ok(header):
        raise _BadFile("header fields are missing or malformed", "header")
    return header, len(fixed) + length


def _header_ok(h: object) -> bool:
    return (isinstance(h, dict) and isinstance(h.get("layout_key"), str) and isinstance(h.get("state_sha256"), str)
            and (h.get("namespace") is None or isinstance(h.get("namespace"), str))
            and isinstance(h.get("tokens"), list) and len(h["tokens"]) > 0
            and all(type(t) is int for t in h["tokens"])
            and type(h.get("state_size")) is int and h["state_size"] >= 0)


def _common_prefix_len(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix, by slice comparisons (C speed) in a binary search."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
