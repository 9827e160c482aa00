"""`GeneratedTokenMemory`: the exact token ids behind assistant replies, per tenant.

A model's reply, tokenized again from its text, does not always give the ids the
model sampled (BPE has many spellings of one string; the model may pick a
non-canonical one). The KV cache holds the sampled ids, so a stateless caller
that sends the reply back as text would miss the cache from the first
differing token on. This memory maps a reply's text to the ids that produced
it; :class:`~kvchat.chat.tokenizer.ChatTokenizer` splices them back in.

Size: the memory is bounded in bytes (`max_bytes`, 64 MiB by default), not in
replies: one reply of 4,096 tokens costs about 16 KiB of ids (4 bytes each, in
one ``bytes`` object) plus its text, and one of 100,000 tokens about 400 KiB
plus its text. What is counted is what the entry holds in RAM: the text object,
the ids object and a fixed allowance for the dictionary slots (see
:func:`entry_bytes`). A reply larger than the whole budget is not remembered.

Tenants: every entry belongs to a namespace (the `cache_key` a request runs
under; the server's is one per API key). A lookup sees its own namespace only,
so one tenant cannot learn whether another received a given reply (the exact
ids would show in its prompt's token count). When the memory is over its
budget it forgets the least recently used reply of the namespace that holds the
most bytes, so a tenant remembering many replies evicts its own first and can
never push another tenant below its own share.

With a `journal` file (kept next to the engine's disk cache), the memory
survives a restart, even a crash: every reply is appended as one JSON line when
it is remembered, and the journal is read back at start. It is compacted (one
line per live entry) at start and whenever it holds more than twice as many
lines as live entries, and only its owner may read it (mode 0600). Compaction
runs on a background thread owned by the memory, never in the caller's thread
(which may be an asyncio event loop): `remember` only appends one line. The
compacted file is written beside the journal, flushed to disk and renamed over
it, so a crash at any point leaves the old journal or the new one, whole; lines
remembered while a compaction runs go to the old journal and are copied to the
end of the new one before the rename.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvchat.atomic_file import TEMP_SUFFIX, leftover_temp_files
from kvchat.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of RAM the memory may hold, all namespaces together (see :func:`entry_bytes`)."""

DEFAULT_MAX_NAMESPACES = 32
"""Namespaces remembered at once; beyond them the least recently used one is forgotten whole."""

ENTRY_OVERHEAD_BYTES = 128
"""What one entry costs beyond its text and ids: its slots in an ordered dictionary
(about 70 to 85 bytes measured on CPython 3.12, counted high for the tables' spare room)."""

NAMESPACE_OVERHEAD_BYTES = 512
"""What one namespace costs beyond its name and entries (its ordered dictionary and bookkeeping)."""

_ID_TYPECODE = "i" if array("i").itemsize == 4 else "l"  # 32-bit ids: every vocabulary fits
_ID_LIMIT = 1 << 31

_JOURNAL_MODE = 0o600

Namespace = str | None


def entry_bytes(text: str, ids: bytes) -> int:
    """The bytes one entry is counted for: its text, its packed ids and :data:`ENTRY_OVERHEAD_BYTES`."""
    return sys.getsizeof(text) + sys.getsizeof(ids) + ENTRY_OVERHEAD_BYTES


def _namespace_bytes(namespace: Namespace) -> int:
    return NAMESPACE_OVERHEAD_BYTES + (sys.getsizeof(namespace) if namespace is not None else 0)


def _pack(ids: Iterable[int]) -> bytes | None:
    """`ids` as 32-bit integers in one bytes object, or None if one does not fit (negative ids do)."""
    try:
        return array(_ID_TYPECODE, ids).tobytes()
    except OverflowError:
        return None


def _unpack(packed: bytes) -> tuple[int, ...]:
    ids = array(_ID_TYPECODE)
    ids.frombytes(packed)
    return tuple(ids)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True)
class JournalWriter:
    """How a compaction writes the new journal; the defaults are the system's.

    `write_all(fd, data)` writes every byte of `data` to the new file; `replace(temp,
    journal)` renames the finished file over the journal. Tests pass stand-ins that
    hold a compaction midway or fail it.
    """

    write_all: Callable[[int, bytes], None] = _write_all
    replace: Callable[[str, Path], None] = os.replace


_SYSTEM_JOURNAL_WRITER = JournalWriter()


class _Space:
    """One namespace: its entries (least recently used first) and the bytes they are counted for."""

    __slots__ = ("entries", "nbytes")

    def __init__(self, namespace: Namespace) -> None:
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = _namespace_bytes(namespace)


class GeneratedTokenMemory:
    """A bounded, thread-safe map from an assistant reply's exact text to the exact
    token ids the model generated for it, per namespace (tenant).

    Bounds:

    - `max_bytes` (default :data:`DEFAULT_MAX_BYTES`, 64 MiB): the RAM all
      entries of all namespaces are counted for (:func:`entry_bytes`: text,
      ids packed as 4-byte integers, and the dictionary slots). Over it, the
      least recently used reply of the namespace holding the most bytes is
      forgotten, until the memory fits again; a reply counted for more than
      `max_bytes` on its own is not remembered (and not journaled).
    - `max_namespaces`: a new namespace beyond them forgets the least recently
      used namespace whole.
    - `max_entries` (optional, default None: no bound): replies per namespace;
      remembering another forgets that namespace's least recently used reply.

    Namespace None (callers without a `cache_key`) is one namespace like the
    others.

    Several callers may share one memory (and one engine): every method takes
    the lock for a few dictionary operations (and the append of a journal
    line) only; compaction of the journal runs on a thread of its own. The text
    must be the content exactly as it will come back in the messages (and so as
    the chat template will see it); ids are those of the reply only, without
    the end-of-generation token. With `n_vocab`, ids must lie in
    ``[0, n_vocab)``.

    `journal`: a file that keeps the entries across restarts (see the module
    docstring); lines that cannot be read (a write cut short by a crash) and
    entries with ids outside the vocabulary are skipped with a log line, and a
    journal that cannot be written only costs the persistence, with a log line.
    `journal_writer` writes the compacted journal (:class:`JournalWriter`).
    """

    def __init__(
        self,
        max_entries: int | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_namespaces: int = DEFAULT_MAX_NAMESPACES,
        journal: str | os.PathLike[str] | None = None,
        n_vocab: int | None = None,
        journal_writer: JournalWriter = _SYSTEM_JOURNAL_WRITER,
    ) -> None:
        bounds = {"max_bytes": max_bytes, "max_namespaces": max_namespaces}
        if max_entries is not None:
            bounds["max_entries"] = max_entries
        for name, value in bounds.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer", field=name)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_namespaces = max_namespaces
        self.n_vocab = n_vocab
        self._spaces: OrderedDict[Namespace, _Space] = OrderedDict()  # least recently used first
        self._count = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._journal = Path(journal) if journal is not None else None
        self._journal_writer = journal_writer
        self._journal_lines = 0
        # Compaction (on its own thread): whether one is running or about to; the lines appended
        # since it took its snapshot (None before the snapshot); whether `forget` or `clear` ran
        # since the snapshot (then it runs again, so that what they dropped leaves the file too;
        # entries evicted by the bounds may stay until the next compaction: the bounds drop them
        # again at load).
        self._compacting = False
        self._tail: list[bytes] | None = None
        self._forgotten_since_snapshot = False
        self._compaction_done = threading.Condition(self._lock)
        if self._journal is not None:
            self._load_journal()

    def remember(self, text: str, token_ids: Iterable[int], *, namespace: Namespace = None) -> None:
        """Remember that the model generated `token_ids` for `text` in `namespace`.

        An empty text or an empty id list is ignored (there is nothing to
        splice), and so is a reply larger than `max_bytes` on its own. A text
        remembered again gets the newer ids. Ids outside the vocabulary raise
        `InvalidRequestError`.
        """
        ids = _pack(int(t) for t in token_ids)
        if not text or ids == b"":
            return
        if ids is None or not self._in_vocabulary(ids):
            raise InvalidRequestError("token ids outside the model's vocabulary", field="token_ids")
        line = _journal_line(namespace, text, ids).encode("utf-8") if self._journal is not None else None
        with self._lock:
            if self._store(namespace, text, ids) and line is not None:
                self._append(line)

    def lookup(self, text: str, *, namespace: Namespace = None) -> tuple[int, ...] | None:
        """The ids remembered for exactly `text` in `namespace` (marking it recently used), or None."""
        with self._lock:
            space = self._spaces.get(namespace)
            ids = space.entries.get(text) if space is not None else None
            if ids is None:
                return None
            assert space is not None
            space.entries.move_to_end(text)
            self._spaces.move_to_end(namespace)
        return _unpack(ids)

    def forget(self, text: str, *, namespace: Namespace = None) -> None:
        """Drop the entry for `text` in `namespace`, if any."""
        with self._lock:
            space = self._spaces.get(namespace)
            if space is not None and text in space.entries:
                self._drop(namespace, space, text)
                self._forgotten_since_snapshot = True
                self._compact_if_due()

    def clear(self) -> None:
        """Drop every entry of every namespace."""
        with self._lock:
            self._spaces.clear()
            self._count = self._bytes = 0
            self._forgotten_since_snapshot = True
            self._compact_if_due()

    @property
    def nbytes(self) -> int:
        """Bytes the entries are counted for (at most `max_bytes`; see :func:`entry_bytes`)."""
        with self._lock:
            return self._bytes

    def wait_for_compaction(self, timeout: float | None = None) -> bool:
        """Block until no journal compaction is running (or `timeout` seconds
        passed: then False). For tests and orderly shutdowns; never needed for
        correctness."""
        with self._compaction_done:
            return self._compaction_done.wait_for(lambda: not self._compacting, timeout)

    def __len__(self) -> int:
        """Entries held, all namespaces together."""
        with self._lock:
            return self._count

    def __contains__(self, text: object) -> bool:
        """True if `text` is remembered in the default namespace (None)."""
        with self._lock:
            space = self._spaces.get(None)
            return space is not None and text in space.entries

    # -- entries (under the lock) ------------------------------------------------------------------

    def _store(self, namespace: Namespace, text: str, ids: bytes) -> bool:
        """Store one entry, then evict until the bounds hold; False if it is too large to store."""
        size = entry_bytes(text, ids)
        if size + _namespace_bytes(namespace) > self.max_bytes:
            logger.debug("not remembering a reply of %d bytes: over the memory's %d", size, self.max_bytes)
            return False
        space = self._spaces.get(namespace)
        if space is None:
            space = self._spaces[namespace] = _Space(namespace)
            self._bytes += space.nbytes
            while len(self._spaces) > self.max_namespaces:
                gone, forgotten = self._spaces.popitem(last=False)
                self._count -= len(forgotten.entries)
                self._bytes -= forgotten.nbytes
                logger.debug("forgot the generated tokens of namespace %r (%d replies)", gone, len(forgotten.entries))
        self._spaces.move_to_end(namespace)
        old = space.entries.pop(text, None)
        if old is not None:
            space.nbytes -= entry_bytes(text, old)
            self._bytes -= entry_bytes(text, old)
            self._count -= 1
        space.entries[text] = ids
        space.nbytes += size
        self._bytes += size
        self._count += 1
        if self.max_entries is not None:
            while len(space.entries) > self.max_entries:
                self._drop(namespace, space, next(iter(space.entries)))
        while self._bytes > self.max_bytes:
            self._evict_one(keep=(namespace, text))
        return True

    def _evict_one(self, keep: tuple[Namespace, str]) -> None:
        """Forget the least recently used entry of the namespace holding the most bytes
        (of equals, the least recently used namespace), never the entry `keep`."""
        order = sorted(self._spaces.items(), key=lambda item: -item[1].nbytes)  # stable: LRU first among equals
        for namespace, space in order:
            oldest = next(iter(space.entries))
            if (namespace, oldest) != keep:
                self._drop(namespace, space, oldest)
                return
        raise AssertionError("the memory is over its budget with one entry that fits it")  # pragma: no cover

    def _drop(self, namespace: Namespace, space: _Space, text: str) -> None:
        size = entry_bytes(text, space.entries.pop(text))
        space.nbytes -= size
        self._bytes -= size
        self._count -= 1
        if not space.entries:
            del self._spaces[namespace]
            self._bytes -= space.nbytes  # what is left: the namespace's own overhead

    def _in_vocabulary(self, ids: bytes) -> bool:
        if not ids:
            return True
        unpacked = array(_ID_TYPECODE)
        unpacked.frombytes(ids)
        return min(unpacked) >= 0 and max(unpacked) < (self.n_vocab if self.n_vocab is not None else _ID_LIMIT)

    # -- journal -----------------------------------------------------------------------------------

    def _append(self, line: bytes) -> None:
        """Append one line to the journal (under the lock: lines stay in order with compactions)."""
        assert self._journal is not None
        if self._tail is not None:
            self._tail.append(line)  # a compaction is writing the new file: it copies the line there
        try:
            fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _JOURNAL_MODE)
            try:
                os.fchmod(fd, _JOURNAL_MODE)  # whatever the umask
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.warning("cannot append to the generated-token journal %s: %s", self._journal, exc)
            return
        self._journal_lines += 1
        self._compact_if_due()

    def _compact_if_due(self) -> None:
        """Start a compaction once the journal holds more than twice as many lines as live entries."""
        if self._journal is not None and self._journal_lines > 2 * self._count:
            self._start_compaction()

    def _start_compaction(self) -> None:
        """Start the compaction thread (under the lock), unless one is running: that one
        runs again if `forget` or `clear` ran since its snapshot."""
        if self._compacting:
            return
        self._compacting = True
        try:
            threading.Thread(target=self._compact_until_current, name="kvchat-token-journal", daemon=True).start()
        except RuntimeError as exc:  # no thread can be started (interpreter shutdown): skip this compaction
            self._compacting = False
            logger.warning("cannot compact the generated-token journal %s: %s", self._journal, exc)

    def _compact_until_current(self) -> None:
        """The compaction thread: compact until nothing was forgotten since the last snapshot."""
        try:
            while self._compact():
                pass
        finally:
            with self._lock:
                self._compacting = False
                self._tail = None
                self._compaction_done.notify_all()

    def _compact(self) -> bool:
        """Rewrite the journal with one line per live entry; True if it should run again.

        The snapshot of the entries is taken under the lock; the file is
        written and flushed to disk without it; under the lock again, the lines
        appended meanwhile are added and the file renamed over the journal.
        An error costs only the compaction (with a log line).
        """
        journal = self._journal
        assert journal is not None
        with self._lock:
            snapshot = [(namespace, list(space.entries.items())) for namespace, space in self._spaces.items()]
            self._tail = []
            self._forgotten_since_snapshot = False
        write_all, replace = self._journal_writer.write_all, self._journal_writer.replace
        lines = 0
        fd, temp = -1, ""
        try:
            fd, temp = tempfile.mkstemp(dir=journal.parent, prefix=f".{journal.name}.", suffix=TEMP_SUFFIX)
            for namespace, entries in snapshot:
                for text, ids in entries:
                    write_all(fd, _journal_line(namespace, text, ids).encode("utf-8"))
                    lines += 1
            del snapshot
            os.fsync(fd)
            with self._lock:
                tail, self._tail = self._tail or [], None
                for line in tail:  # appended since the snapshot: they follow it, in order
                    write_all(fd, line)
                replace(temp, journal)  # mkstemp made it 0600
                temp = ""
                self._journal_lines = lines + len(tail)
                again = self._forgotten_since_snapshot
        except OSError as exc:
            logger.warning("cannot compact the generated-token journal %s: %s", journal, exc)
            return False
        finally:
            if fd >= 0:
                os.close(fd)
            if temp:
                Path(temp).unlink(missing_ok=True)
        _fsync_directory(journal.parent)
        return again

    def _load_journal(self) -> None:
        assert self._journal is not None
        journal = self._journal
        with suppress(OSError):
            for leftover in leftover_temp_files(journal.parent, journal.name):
                leftover.unlink()
        try:
            content = journal.read_text(encoding="utf-8", errors="replace")
            os.chmod(journal, _JOURNAL_MODE)  # a journal of an older version may be readable by all
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("cannot read the generated-token journal %s: %s", journal, exc)
            return
        lines = content.splitlines()
        unreadable = outside = 0
        for line in lines:
            entry = _parse_journal_line(line)
            if entry is None:
                unreadable += 1
                continue
            namespace, text, ids = entry
            packed = _pack(ids)
            if packed is None or not self._in_vocabulary(packed):
                outside += 1
            elif text and packed:
                self._store(namespace, text, packed)
        if unreadable:
            logger.warning("skipped %d unreadable line(s) of the generated-token journal %s", unreadable, journal)
        if outside:
            logger.warning(
                "dropped %d entr(ies) of the generated-token journal %s with token ids outside the vocabulary (%s)",
                outside,
                journal,
                self.n_vocab,
            )
        self._journal_lines = len(lines)
        if content and not content.endswith("\n"):
            # A line cut short by a crash: end it, so that the next line is not glued to it
            # (it stays unreadable, and the compaction below drops it).
            self._append_newline()
        if self._journal_lines > self._count:
            with self._lock:
                self._start_compaction()

    def _append_newline(self) -> None:
        assert self._journal is not None
        try:
            with self._journal.open("ab") as file:
                file.write(b"\n")
        except OSError as exc:
            logger.warning("cannot append to the generated-token journal %s: %s", self._journal, exc)


def _fsync_directory(directory: Path) -> None:
    """Flush a rename in `directory` to disk (POSIX; a file system that cannot is skipped)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _journal_line(namespace: Namespace, text: str, ids: bytes) -> str:
    """``[text, ids]`` for the default namespace (the format of older versions), else ``[text, ids, namespace]``."""
    fields: list[Any] = [text, list(_unpack(ids))]
    if namespace is not None:
        fields.append(namespace)
    return json.dumps(fields, ensure_ascii=False) + "\n"


def _parse_journal_line(line: str) -> tuple[Namespace, str, tuple[int, ...]] | None:
    """``(namespace, text, ids)`` of one journal line, or None if it is not one."""
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, list) or len(fields) not in (2, 3):
        return None
    text, ids, namespace = fields[0], fields[1], fields[2] if len(fields) == 3 else None
    if not isinstance(text, str) or not isinstance(ids, list) or not isinstance(namespace, (str, type(None))):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return None
    return namespace, text, tuple(ids)
