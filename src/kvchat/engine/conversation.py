"""`Conversation`: explicit control of one KV sequence (prompt, generate, fork,
rewind, shift, save, load), for callers who want to hold state themselves.

An engine handle like `Stream`: every KV operation runs on the engine's worker
thread (as a :class:`~kvchat.engine.pinning.PinnedSequences` operation) and
generation goes through the same step planner and `Stream` as `Engine.submit`.
A conversation's sequence is pinned: the prefix cache never evicts it.
Different conversations may be used from different threads or tasks at once;
one conversation generates one reply at a time. Files are of the kind
:data:`~kvchat.engine.state_file.CONVERSATION`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from kvchat.engine import state_file
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.state_file import CONVERSATION, StateFileError
from kvchat.engine.stream import Stream
from kvchat.errors import ConversationFileError, InvalidRequestError
from kvchat.llama import Model

T = TypeVar("T")


class ConversationHost(Protocol):
    """What a conversation needs from its engine (`Engine` is the one host)."""

    @property
    def model(self) -> Model: ...

    def submit(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        pinned: PinnedSequence | None = None,
    ) -> Stream: ...

    def _on_worker(self, function: Callable[[PinnedSequences], T]) -> T: ...


class Conversation:
    """One conversation's tokens and KV state, made by `Engine.conversation()` or
    `Engine.load_conversation()`.

    `tokens` are resident in the KV cache; `pending` are queued by :meth:`prompt`
    and evaluated by the next :meth:`generate`. Close it (or use `with`) to free
    its sequence. Every call on a closed conversation raises `InvalidRequestError`.
    """

    def __init__(self, engine: ConversationHost, pinned: PinnedSequence, pending: Sequence[int] = ()) -> None:
        self._engine = engine
        self._pinned = pinned
        self._pending: list[int] = list(pending)
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        """The tokens whose KV is resident (a copy)."""
        self._check_open()
        return list(self._pinned.tokens)

    @property
    def pending(self) -> list[int]:
        """Tokens queued for the next generation (a copy)."""
        self._take_unevaluated()
        return list(self._pending)

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._pinned.closed

    def _check_open(self) -> None:
        if self._pinned.closed:
            raise InvalidRequestError("the conversation is closed", field="conversation")

    def _check_idle(self) -> None:
        self._check_open()
        if self._pinned.generating:
            raise InvalidRequestError(
                "the conversation is generating; wait for its stream to end", field="conversation"
            )
        self._take_unevaluated()

    def _take_unevaluated(self) -> None:
        """The last reply's sampled-but-unevaluated token goes first in line."""
        pinned = self._pinned
        if not pinned.generating and pinned.unevaluated:
            self._pending[:0] = pinned.unevaluated
            pinned.unevaluated = []

    # -- generation ----------------------------------------------------------------------------

    def prompt(self, tokens_or_text: Sequence[int] | str) -> None:
        """Queue tokens (or text, tokenized as plain text; BOS added if this is the start)."""
        with self._lock:
            self._check_idle()
            if isinstance(tokens_or_text, str):
                at_start = not self._pinned.tokens and not self._pending
                tokens = self._engine.model.tokenize(tokens_or_text, add_special=at_start)
            else:
                tokens = [int(t) for t in tokens_or_text]
            self._pending.extend(tokens)

    def generate(self, sampling: SamplingParams | None = None) -> Stream:
        """Evaluate the pending tokens and generate; returns the same `Stream` as
        `Engine.submit`. The reply's tokens become resident, except the last one
        sampled, which is queued as pending (it has no KV yet)."""
        with self._lock:
            self._check_idle()
            pinned = self._pinned
            if not self._pending:
                if not pinned.tokens:
                    raise InvalidRequestError("nothing to generate from: prompt() first", field="prompt")
                last = pinned.tokens[-1]  # fresh logits need one evaluated token
                self._engine._on_worker(lambda ops: ops.truncate(pinned, len(pinned.tokens) - 1))
                self._pending = [last]
            prompt = pinned.tokens + self._pending
            pinned.generating = True
            try:
                stream = self._engine.submit(prompt, sampling, pinned=pinned)
            except BaseException:
                pinned.generating = False
                raise
            self._pending = []
            return stream

    # -- KV operations ---------------------------------------------------------------------------

    def fork(self) -> Conversation:
        """A new conversation sharing every cell so far (no copy); both diverge from here."""
        with self._lock:
            self._check_idle()
            child = self._engine._on_worker(lambda ops: ops.fork(self._pinned))
            return Conversation(self._engine, child, self._pending)

    def rewind(self, n: int) -> None:
        """Drop the last `n` tokens (pending ones first, then resident ones)."""
        with self._lock:
            self._check_idle()
            total = len(self._pinned.tokens) + len(self._pending)
            if not isinstance(n, int) or not 0 <= n <= total:
                raise InvalidRequestError(f"rewind needs 0 <= n <= {total}", field="n")
            from_pending = min(n, len(self._pending))
            del self._pending[len(self._pending) - from_pending :]
            keep = len(self._pinned.tokens) - (n - from_pending)
            self._engine._on_worker(lambda ops: ops.truncate(self._pinned, keep))

    def shift_left(self, keep: int, n: int) -> None:
        """Drop `n` resident tokens after the first `keep` and move the rest back
        (models that cannot shift positions raise `InvalidRequestError`)."""
        with self._lock:
            self._check_idle()
            resident = len(self._pinned.tokens)
            if not (isinstance(keep, int) and isinstance(n, int) and keep >= 0 and n >= 1 and keep + n <= resident):
                raise InvalidRequestError(f"shift_left needs keep >= 0, n >= 1, keep + n <= {resident}", field="n")
            self._engine._on_worker(lambda ops: ops.shift_left(self._pinned, keep, n))

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokens and KV state to `path` atomically, with a header naming the
        model (sha256) and KV layout it belongs to."""
        with self._lock:
            self._check_idle()
            pinned = self._pinned
            state, layout = self._engine._on_worker(lambda ops: ops.state(pinned))
            state_file.write(
                path, CONVERSATION, layout_key=layout, tokens=pinned.tokens, state=state, pending=self._pending
            )

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the conversation's sequence. Safe to call twice."""
        with self._lock:
            if self._pinned.closed:
                return
            self._check_idle()
            self._engine._on_worker(lambda ops: ops.unpin(self._pinned))

    def __enter__(self) -> Conversation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class SavedConversation:
    """A conversation file's content."""

    tokens: list[int]
    pending: list[int]
    state: bytes


def read_conversation_file(path: Path, *, layout_key: str) -> SavedConversation:
    """Read a file written by `Conversation.save` for `layout_key`; `ConversationFileError` if it
    cannot be used (missing, damaged, of another version, model or KV layout)."""
    try:
        saved = state_file.read(path, CONVERSATION, layout_key=layout_key)
    except StateFileError as exc:
        why = {
            "io": f"cannot be read ({exc})",
            "foreign": "was saved from another model or KV layout",
            "header": f"is not a kvchat conversation file of this version ({exc})",
            "data": f"is truncated or damaged ({exc})",
        }[exc.problem]
        raise ConversationFileError(f"{path} {why}", field="path") from exc
    assert saved.state is not None
    return SavedConversation(list(saved.tokens), list(saved.header["pending"]), saved.state)
