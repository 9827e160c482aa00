"""`GeneratedTokenMemory`: the exact token ids behind assistant replies.

A model's reply, tokenized again from its text, does not always give the ids the
model sampled (BPE has many spellings of one string; the model may pick a
non-canonical one). The KV cache holds the sampled ids, so a stateless caller
that sends the reply back as text would miss the cache from the first
differing token on. This memory maps a reply's text to the ids that produced
it; :class:`~kvchat.chat.tokenizer.ChatTokenizer` splices them back in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from kvchat.errors import InvalidRequestError

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
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise InvalidRequestError("max_entries must be a positive integer", field="max_entries")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str, token_ids: Iterable[int]) -> None:
        """Remember that the model generated `token_ids` for `text`.

        An empty text or an empty id list is ignored (there is nothing to
        splice). A text remembered again gets the newer ids.
        """
        ids = tuple(int(t) for t in token_ids)
        if not text or not ids:
            return
        with self._lock:
            self._entries[text] = ids
            self._entries.move_to_end(text)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

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
