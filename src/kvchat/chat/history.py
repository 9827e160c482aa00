"""`GeneratedTokenMemory`: the exact token ids behind assistant replies.

A model's reply, tokenized again from its text, does not always give the ids the
model sampled (BPE has many spellings of one string; the model may pick a
non-canonical one). The KV cache holds the sampled ids, so a stateless caller
that sends the reply back as text would miss the cache from the first
differing token on. This memory maps a reply's text to the ids that produced
it; :class:`~kvchat.chat.tokenizer.ChatTokenizer` splices them back in.

With a `journal` file (kept next to the engine's disk cache), the memory
survives a restart, even a crash: every reply is appended as one JSON line when
it is remembered, and the journal is read back (and compacted) at start, so
conversations restored from the disk cache still match token for token.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from kvchat.atomic_file import write_atomically
from kvchat.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 1024


class GeneratedTokenMemory:
    """A bounded, thread-safe LRU map from an assistant reply's exact text to the
    exact token ids the model generated for it.

    Several callers may share one memory (and one engine): every method takes
    the lock for a few dictionary operations only. When it holds `max_entries`
    replies, remembering another forgets the least recently used one. The text
    must be the content exactly as it will come back in the messages (and so as
    the chat template will see it); ids are those of the reply only, without
    the end-of-generation token.

    `journal`: a file that keeps the entries across restarts (see the module
    docstring); lines that cannot be read (a write cut short by a crash) are
    skipped with a log line, and a journal that cannot be written only costs
    the persistence, with a log line.
    """

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, *, journal: str | os.PathLike[str] | None = None
    ) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise InvalidRequestError("max_entries must be a positive integer", field="max_entries")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._journal = Path(journal) if journal is not None else None
        if self._journal is not None:
            self._load_journal()

    def remember(self, text: str, token_ids: Iterable[int]) -> None:
        """Remember that the model generated `token_ids` for `text`.

        An empty text or an empty id list is ignored (there is nothing to
        splice). A text remembered again gets the newer ids.
        """
        ids = tuple(int(t) for t in token_ids)
        if not text or not ids:
            return
        with self._lock:
            self._store(text, ids)
            if self._journal is not None:
                self._append(text, ids)

    def _store(self, text: str, ids: tuple[int, ...]) -> None:
        self._entries[text] = ids
        self._entries.move_to_end(text)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    # -- journal ----------------------------------------------------------------

    def _append(self, text: str, ids: tuple[int, ...]) -> None:
        assert self._journal is not None
        try:
            with self._journal.open("a", encoding="utf-8") as journal:
                journal.write(json.dumps([text, ids], ensure_ascii=False) + "\n")
        except OSError as exc:
            logger.warning("cannot append to the generated-token journal %s: %s", self._journal, exc)

    def _load_journal(self) -> None:
        assert self._journal is not None
        try:
            lines = self._journal.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("cannot read the generated-token journal %s: %s", self._journal, exc)
            return
        skipped = 0
        for line in lines:
            try:
                text, ids = json.loads(line)
                if not isinstance(text, str) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("not a [text, ids] pair")
            except (ValueError, TypeError):
                skipped += 1
                continue
            if text and ids:
                self._store(text, tuple(ids))
        if skipped:
            logger.warning("skipped %d unreadable line(s) of the generated-token journal %s", skipped, self._journal)
        if len(lines) > len(self._entries):  # compact: one line per entry still remembered
            body = "".join(json.dumps([t, list(i)], ensure_ascii=False) + "\n" for t, i in self._entries.items())
            try:
                write_atomically(self._journal, body.encode("utf-8"))
            except OSError as exc:
                logger.warning("cannot compact the generated-token journal %s: %s", self._journal, exc)

    def lookup(self, text: str) -> tuple[int, ...] | None:
        """The ids remembered for exactly `text` (marking it recently used), or None."""
        with self._lock:
            ids = self._entries.get(text)
            if ids is not None:
                self._entries.move_to_end(text)
            return ids

    def forget(self, text: str) -> None:
        """Drop the entry for `text`, if any."""
        with self._lock:
            self._entries.pop(text, None)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, text: object) -> bool:
        with self._lock:
            return text in self._entries
