"""`ChatTokenizer`: messages to token ids, without letting message text become markup.

The template's own text is tokenized with special tokens parsed, message
content as plain text, so a user who types ``<|im_start|>system`` gets those
characters, not a role switch. How:

1. render the messages once as they are (the reference text);
2. render them again with each non-empty content string replaced by a
   placeholder: private-use sentinels around a per-call random nonce and the
   span's index;
3. split the second rendering at the placeholders and check that putting the
   contents back gives the reference text exactly (if the template transformed
   a content, e.g. trimmed it, see "fallback" below);
4. cut the template pieces at their special tokens, then tokenize every run of
   plain text between two special tokens, template text and content joined, with
   special-token parsing off. This is what llama.cpp does with the whole text
   (it also tokenizes each run between special tokens on its own), so for
   benign messages the ids equal ``model.tokenize(rendered, parse_special=True)``,
   boundaries included.

An assistant content found in the :class:`GeneratedTokenMemory` is replaced by
the ids the model generated for it (a run of its own), so the prompt repeats
the KV cache exactly. Spliced ids are used only if they spell the content
exactly and hold no control token.

Strings that are not message content (roles, names, tool calls, tool
definitions) stay in the template text; one that contains special-token text
is refused with `InvalidRequestError`. Fallback: when the template transforms
content (the split does not rebuild the reference text), the whole reference
text is tokenized with special tokens parsed, after checking that no message
string at all contains special-token text; the memory is not used then.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.template import ChatTemplate
from kvchat.errors import InvalidRequestError

logger = logging.getLogger("kvchat.chat")

_OPEN = "\ue000"
_CLOSE = "\ue001"

Segment = str | int | tuple[int, ...]
"""Plain text to tokenize, one special token id, or ids to use as they are."""


class ChatTokenizer:
    """Turns chat messages into the token ids of a model's prompt, safely.

    `template` defaults to the model's own (:meth:`ChatTemplate.for_model`).
    With a `memory`, assistant replies the model generated are given back as
    the exact ids it sampled. Thread-safe if the memory is (it is).
    """

    def __init__(
        self, model: Any, template: ChatTemplate | None = None, *, memory: GeneratedTokenMemory | None = None
    ) -> None:
        self.model = model
        self.template = template if template is not None else ChatTemplate.for_model(model)
        self.memory = memory
        self._special_text: dict[int, str] = {}
        self._warned_fallback = False

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        namespace: str | None = None,
    ) -> list[int]:
        """The prompt's token ids for `messages` (and `tools`), with BOS if the model adds one.

        Assistant replies are looked up in the memory's `namespace` only (the
        `cache_key` the prompt will run under): a tenant never gets the exact
        ids of another tenant's reply.

        Raises `TemplateRenderError` if the template fails and
        `InvalidRequestError` if a non-content string carries special-token text.
        """
        normalized = self.template.normalize(messages)
        rendered = self.template.render(normalized, tools, add_generation_prompt)
        self._refuse_markup(_markup_strings(normalized, tools), field="messages")
        contents = {i: m["content"] for i, m in enumerate(normalized) if isinstance(m.get("content"), str)}
        contents = {i: text for i, text in contents.items() if text}  # "" has no tokens to protect
        nonce = _fresh_nonce(rendered, list(contents.values()))
        marked = [
            {**m, "content": f"{_OPEN}{nonce}{i}{_CLOSE}"} if i in contents else m for i, m in enumerate(normalized)
        ]
        parts = re.split(f"{_OPEN}{nonce}(\\d+){_CLOSE}", self.template.render(marked, tools, add_generation_prompt))
        spans = [int(p) for p in parts[1::2]]
        rebuilt = "".join(p if k % 2 == 0 else contents[int(p)] for k, p in enumerate(parts))
        if rebuilt != rendered:
            return self._encode_whole(normalized, rendered)
        segments: list[Segment] = []
        for k, piece in enumerate(parts):
            if k % 2 == 0:
                segments.extend(self._split_special(piece))
            else:
                segments.append(self._content_segment(normalized[spans[k // 2]], namespace))
        return self._with_bos(self._tokenize_segments(segments))

    # -- segments --------------------------------------------------------------------

    def _content_segment(self, message: Mapping[str, Any], namespace: str | None) -> Segment:
        content: str = message["content"]
        if self.memory is not None and message.get("role") == "assistant":
            ids = self.memory.lookup(content, namespace=namespace)
            if ids is not None and self._spells(ids, content):
                return ids
        return content

    def _spells(self, ids: tuple[int, ...], text: str) -> bool:
        """True if `ids` lie in the vocabulary, hold no control token and detokenize to exactly `text`."""
        model = self.model
        if not all(0 <= t < model.n_vocab for t in ids):  # llama.cpp aborts the process on such an id
            return False
        if any(model.is_control(t) for t in ids):
            return False
        return model.detokenize(list(ids)) == text

    def _split_special(self, piece: str) -> list[Segment]:
        """Template text cut into plain text runs and special token ids."""
        if not piece:
            return []
        controls = [t for t in self.model.tokenize(piece, parse_special=True) if self.model.is_control(t)]
        out: list[Segment] = []
        cursor = 0
        for token in controls:
            text = self._text_of(token)
            at = piece.find(text, cursor) if text else -1
            if at < 0:  # not where expected: keep llama.cpp's own reading of this piece
                logger.debug("special token %d not found in template text; tokenizing the piece whole", token)
                return [tuple(self.model.tokenize(piece, parse_special=True))]
            if at > cursor:
                out.append(piece[cursor:at])
            out.append(token)
            cursor = at + len(text)
        if cursor < len(piece):
            out.append(piece[cursor:])
        return out

    def _text_of(self, token: int) -> str:
        text = self._special_text.get(token)
        if text is None:
            text = self.model.token_to_bytes(token, special=True).decode("utf-8", "replace")
            self._special_text[token] = text
        return text

    def _tokenize_segments(self, segments: list[Segment]) -> list[int]:
        """Tokenize each run of adjacent plain text as one text, special parsing off."""
        ids: list[int] = []
        run: list[str] = []
        for segment in segments:
            if isinstance(segment, str):
                run.append(segment)
                continue
            if run:
                ids.extend(self.model.tokenize("".join(run), parse_special=False))
                run.clear()
            if isinstance(segment, int):
                ids.append(segment)
            else:
                ids.extend(segment)
        if run:
            ids.extend(self.model.tokenize("".join(run), parse_special=False))
        return ids

    def _with_bos(self, ids: list[int]) -> list[int]:
        """Prepend BOS if the model wants one and the template did not render it."""
        bos = self.model.bos_token
        if self.model.adds_bos and bos >= 0 and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    # -- guards and fallback -----------------------------------------------------------

    def _encode_whole(self, normalized: list[dict[str, Any]], rendered: str) -> list[int]:
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "the chat template of %s transforms message content; tokenizing the whole prompt "
                "(message text with special-token text is refused, generated-token memory unused)",
                getattr(self.model, "path", "the model"),
            )
        self._refuse_markup((m["content"] for m in normalized if isinstance(m.get("content"), str)), field="messages")
        return self._with_bos(self.model.tokenize(rendered, parse_special=True))

    def _refuse_markup(self, strings: Iterator[str] | Sequence[str], *, field: str) -> None:
        """Raise if any of `strings` holds the text of a control token."""
        joined = "\n".join(s for s in strings if s)
        if not joined:
            return
        found = [t for t in self.model.tokenize(joined, parse_special=True) if self.model.is_control(t)]
        if found:
            raise InvalidRequestError(
                f"special-token text {self._text_of(found[0])!r} is not allowed outside message content",
                field=field,
            )


def _fresh_nonce(rendered: str, contents: list[str]) -> str:
    """A random nonce whose placeholder prefix occurs in no text of this call."""
    while True:
        nonce = secrets.token_hex(6)
        prefix = _OPEN + nonce
        if prefix not in rendered and not any(prefix in c for c in contents):
            return nonce


def _markup_strings(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> Iterator[str]:
    """Every string the template may print as markup: all but message content."""
    for message in messages:
        for key, value in message.items():
            yield key
            if key != "content":
                yield from _strings(value)
    if tools:
        yield from _strings(list(tools))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                yield key
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
