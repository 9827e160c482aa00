"""KV-state files: one format for spilled cache entries and saved conversations.

A file is the kind's magic bytes, ``<HI`` (format version, JSON header length),
a UTF-8 JSON header, then the state bytes of ``llama_state_seq_get_data``. Every
header has ``layout_key`` (the model file and KV layout the state belongs to),
``tokens`` (the token ids whose KV the state holds), ``state_size`` and
``state_sha256``; each kind adds its own fields (a cache entry's ``namespace``, a
conversation's ``pending`` tokens). Files are written atomically
(:func:`~kvchat.atomic_file.write_atomically`) and read with a bounded header
whose every field is checked, so a damaged or hostile file is a
:class:`StateFileError`, never a crash or a huge allocation.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from kvchat.atomic_file import write_atomically

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Longest header read (about 6 million token ids): a larger length field means a damaged file."""
_FIXED = struct.Struct("<HI")  # format version, JSON header length

Problem = Literal["io", "foreign", "header", "data"]


class StateFileError(Exception):
    """A state file that cannot be used. `problem`: "io" (missing or unreadable),
    "foreign" (written for another model or KV layout), "header" (bad magic, version
    or header), "data" (a valid header whose state bytes are missing or damaged)."""

    def __init__(self, reason: str, problem: Problem) -> None:
        super().__init__(reason)
        self.problem = problem


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(type(t) is int and t >= 0 for t in value)


def _is_optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


@dataclass(frozen=True)
class FileKind:
    """One kind of state file: its magic bytes and the header fields it adds."""

    magic: bytes
    fields: Mapping[str, Callable[[object], bool]]
    """Extra header fields and the check each value must pass."""


CACHE_ENTRY = FileKind(b"KVCHAT-STATE\x00", {"namespace": _is_optional_str})
"""A prefix-cache entry spilled to the disk tier (`StateStore`)."""
CONVERSATION = FileKind(b"KVCHAT-CONVERSATION\x00", {"pending": _is_token_list})
"""A conversation written by `Conversation.save`."""

_COMMON_FIELDS: Mapping[str, Callable[[object], bool]] = {
    "layout_key": lambda v: isinstance(v, str),
    "tokens": _is_token_list,
    "state_size": lambda v: type(v) is int and v >= 0,
    "state_sha256": lambda v: isinstance(v, str) and len(v) == 64,
}


@dataclass(frozen=True)
class StateFile:
    """A state file as read: its header, its state bytes (None if not loaded),
    and the file's size and modification time."""

    header: dict[str, Any]
    state: bytes | None
    file_size: int
    mtime: float

    @property
    def tokens(self) -> tuple[int, ...]:
        """The token ids whose KV the state holds."""
        return tuple(self.header["tokens"])


def header_bytes(
    kind: FileKind, *, layout_key: str, tokens: tuple[int, ...] | list[int], state: bytes, **fields: object
) -> bytes:
    """Everything of a file of `kind` that comes before the state bytes."""
    header = {
        "layout_key": layout_key,
        "tokens": list(tokens),
        **fields,
        "state_size": len(state),
        "state_sha256": hashlib.sha256(state).hexdigest(),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    return kind.magic + _FIXED.pack(FORMAT_VERSION, len(raw)) + raw


def write(
    path: str | os.PathLike[str],
    kind: FileKind,
    *,
    layout_key: str,
    tokens: tuple[int, ...] | list[int],
    state: bytes,
    **fields: object,
) -> int:
    """Write a file of `kind` atomically; returns its size. Raises OSError."""
    header = header_bytes(kind, layout_key=layout_key, tokens=tokens, state=state, **fields)
    write_atomically(path, header, state)
    return len(header) + len(state)


def read(path: Path, kind: FileKind, *, layout_key: str, load: bool = True) -> StateFile:
    """Read and check a file of `kind` belonging to `layout_key`.

    With `load`, the state bytes are read and checked against the header's size
    and sha256; without, only the header is read (and the file size checked).
    Raises :class:`StateFileError`.
    """
    try:
        with open(path, "rb") as f:
            header, offset = _read_header(f, kind)
            st = os.fstat(f.fileno())
            if header["layout_key"] != layout_key:
                raise StateFileError("foreign file (another model or KV layout)", "foreign")
            expected = offset + header["state_size"]
            if st.st_size != expected:
                raise StateFileError(f"file is {st.st_size} bytes, expected {expected} (truncated or partial)", "data")
            state = f.read(header["state_size"]) if load else None
    except FileNotFoundError as exc:
        raise StateFileError("file is missing", "io") from exc
    except OSError as exc:
        raise StateFileError(f"unreadable ({exc})", "io") from exc
    if state is not None and (
        len(state) != header["state_size"] or hashlib.sha256(state).hexdigest() != header["state_sha256"]
    ):
        raise StateFileError("checksum mismatch (corrupt state)", "data")
    return StateFile(header, state, st.st_size, st.st_mtime)


def _read_header(f: BinaryIO, kind: FileKind) -> tuple[dict[str, Any], int]:
    """The checked JSON header and the offset of the state bytes."""
    fixed_size = len(kind.magic) + _FIXED.size
    fixed = f.read(fixed_size)
    if len(fixed) < fixed_size or not fixed.startswith(kind.magic):
        raise StateFileError("bad magic bytes (not a kvchat state file of this kind)", "header")
    version, length = _FIXED.unpack_from(fixed, len(kind.magic))
    if version != FORMAT_VERSION:
        raise StateFileError(f"unsupported format version {version}", "header")
    if length > MAX_HEADER_BYTES:
        raise StateFileError(f"header length {length} is implausible", "header")
    raw = f.read(length)
    if len(raw) != length:
        raise StateFileError("truncated header", "header")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise StateFileError("header is not valid JSON", "header") from exc
    checks = {**_COMMON_FIELDS, **kind.fields}
    if not isinstance(header, dict) or any(
        name not in header or not check(header[name]) for name, check in checks.items()
    ):
        raise StateFileError("header fields are missing or malformed", "header")
    return header, fixed_size + length
