"""`GeneratedTokenMemory`: the exact token ids behind assistant replies, per tenant.

A model's reply, tokenized again from its text, does not always give the ids the
model sampled (BPE has many spellings of one string; the model may pick a
non-canonical one). The KV cache holds the sampled ids, so a stateless caller
that sends the reply back as text would miss the cache from the first
differing token on. This memory maps a reply's text to the ids that produced
it; :class:`~kvchat.chat.tokenizer.ChatTokenizer` splices them back in.

Tenants: every entry belongs to a namespace (the `cache_key` a request runs
under; the server's is one per API key). A lookup sees its own namespace only,
so one tenant cannot learn whether another received a given reply (the exact
ids would show in its prompt's token count), and each namespace is an LRU of
its own, so one tenant remembering many replies never evicts another's.

With a `journal` file (kept next to the engine's disk cache), the memory
survives a restart, even a crash: every reply is appended as one JSON line when
it is remembered, and the journal is read back at start. It is compacted (one
line per live entry) at start and whenever it holds more than twice as many
lines as live entries, and only its owner may read it (mode 0600).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from kvchat.atomic_file import leftover_temp_files, write_atomically
from kvchat.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 1024
"""Replies remembered per namespace."""

DEFAULT_MAX_NAMESPACES = 32
"""Namespaces remembered at once; beyond them the least recently used one is forgotten whole."""

_JOURNAL_MODE = 0o600

Namespace = str | None


class GeneratedTokenMemory:
    """A bounded, thread-safe map from an assistant reply's exact text to the exact
    token ids the model generated for it, per namespace (tenant).

    Each namespace is an LRU of at most `max_entries` replies: remembering
    another forgets that namespace's least recently used reply, never another
    namespace's. At most `max_namespaces` namespaces are kept: a new one beyond
    them forgets the least recently used namespace whole. So the memory holds at
    most ``max_entries * max_namespaces`` replies. Namespace None (callers
    without a `cache_key`) is one namespace like the others.

    Several callers may share one memory (and one engine): every method takes
    the lock for a few dictionary operations (and a journal line) only. The text
    must be the content exactly as it will come back in the messages (and so as
    the chat template will see it); ids are those of the reply only, without
    the end-of-generation token. With `n_vocab`, ids must lie in
    ``[0, n_vocab)``.

    `journal`: a file that keeps the entries across restarts (see the module
    docstring); lines that cannot be read (a write cut short by a crash) and
    entries with ids outside the vocabulary are skipped with a log line, and a
    journal that cannot be written only costs the persistence, with a log line.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        max_namespaces: int = DEFAULT_MAX_NAMESPACES,
        journal: str | os.PathLike[str] | None = None,
        n_vocab: int | None = None,
    ) -> None:
        for name, value in (("max_entries", max_entries), ("max_namespaces", max_namespaces)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer", field=name)
        self.max_entries = max_entries
        self.max_namespaces = max_namespaces
        self.n_vocab = n_vocab
        self._spaces: OrderedDict[Namespace, OrderedDict[str, tuple[int, ...]]] = OrderedDict()  # LRU first
        self._count = 0
        self._lock = threading.Lock()
        self._journal = Path(journal) if journal is not None else None
        self._journal_lines = 0
        if self._journal is not None:
            self._load_journal()

    def remember(self, text: str, token_ids: Iterable[int], *, namespace: Namespace = None) -> None:
        """Remember that the model generated `token_ids` for `text` in `namespace`.

        An empty text or an empty id list is ignored (there is nothing to
        splice). A text remembered again gets the newer ids. Ids outside the
        vocabulary raise `InvalidRequestError`.
        """
        ids = tuple(int(t) for t in token_ids)
        if not text or not ids:
            return
        if not self._in_vocabulary(ids):
            raise InvalidRequestError("token ids outside the model's vocabulary", field="token_ids")
        with self._lock:
            self._store(namespace, text, ids)
            if self._journal is not None:
                self._append(namespace, text, ids)

    def lookup(self, text: str, *, namespace: Namespace = None) -> tuple[int, ...] | None:
        """The ids remembered for exactly `text` in `namespace` (marking it recently used), or None."""
        with self._lock:
            entries = self._spaces.get(namespace)
            ids = entries.get(text) if entries is not None else None
            if ids is not None:
                assert entries is not None
                entries.move_to_end(text)
                self._spaces.move_to_end(namespace)
            return ids

    def forget(self, text: str, *, namespace: Namespace = None) -> None:
        """Drop the entry for `text` in `namespace`, if any."""
        with self._lock:
            entries = self._spaces.get(namespace)
            if entries is not None and entries.pop(text, None) is not None:
                self._count -= 1
                if not entries:
                    del self._spaces[namespace]
                self._compact_if_due()

    def clear(self) -> None:
        """Drop every entry of every namespace."""
        with self._lock:
            self._spaces.clear()
            self._count = 0
            self._compact_if_due()

    def __len__(self) -> int:
        """Entries held, all namespaces together."""
        with self._lock:
            return self._count

    def __contains__(self, text: object) -> bool:
        """True if `text` is remembered in the default namespace (None)."""
        with self._lock:
            entries = self._spaces.get(None)
            return entries is not None and text in entries

    # -- entries -----------------------------------------------------------------------------------

    def _store(self, namespace: Namespace, text: str, ids: tuple[int, ...]) -> None:
        entries = self._spaces.get(namespace)
        if entries is None:
            entries = self._spaces[namespace] = OrderedDict()
            while len(self._spaces) > self.max_namespaces:
                gone, forgotten = self._spaces.popitem(last=False)
                self._count -= len(forgotten)
                logger.debug("forgot the generated tokens of namespace %r (%d replies)", gone, len(forgotten))
        self._spaces.move_to_end(namespace)
        self._count += text not in entries
        entries[text] = ids
        entries.move_to_end(text)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self._count -= 1

    def _in_vocabulary(self, ids: tuple[int, ...]) -> bool:
        limit = self.n_vocab if self.n_vocab is not None else 1 << 31
        return all(0 <= t < limit for t in ids)

    # -- journal -----------------------------------------------------------------------------------

    def _append(self, namespace: Namespace, text: str, ids: tuple[int, ...]) -> None:
        assert self._journal is not None
        line = _journal_line(namespace, text, ids).encode("utf-8")
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
        """Compact the journal once it holds more than twice as many lines as live entries."""
        if self._journal is not None and self._journal_lines > 2 * self._count:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal with one line per live entry (an error costs only the compaction)."""
        assert self._journal is not None
        body = "".join(
            _journal_line(namespace, text, ids)
            for namespace, entries in self._spaces.items()
            for text, ids in entries.items()
        )
        try:
            write_atomically(self._journal, body.encode("utf-8"))  # a new file of mode 0600
        except OSError as exc:
            logger.warning("cannot compact the generated-token journal %s: %s", self._journal, exc)
            return
        self._journal_lines = self._count

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
            elif not self._in_vocabulary(entry[2]):
                outside += 1
            elif entry[1] and entry[2]:
                self._store(*entry)
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
        cut_short = bool(content) and not content.endswith("\n")  # the next line would be glued to it
        if self._journal_lines > self._count or cut_short:
            self._compact()


def _journal_line(namespace: Namespace, text: str, ids: tuple[int, ...]) -> str:
    """``[text, ids]`` for the default namespace (the format of older versions), else ``[text, ids, namespace]``."""
    fields: list[Any] = [text, list(ids)] if namespace is None else [text, list(ids), namespace]
    return json.dumps(fields, ensure_ascii=False) + "\n"


def _parse_journal_line(line: str) -> tuple[Namespace, str, tuple[int, ...]] | None:
    """``(namespace, text, ids)`` of one journal line, or None if it is not one."""
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, list) or len(fields) not in (2, 3):
        return None
    text, ids, namespace = fields[0], fields[1], fields[2] if len(fields) == 3 else None
    if not isinstance(text, str) or not isinstance(ids, list) or not isinstance(namespace, (str, type(None))):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return None
    return namespace, text, tuple(ids)
