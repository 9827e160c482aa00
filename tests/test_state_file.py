"""KV-state files (`kvchat.engine.state_file`) and atomic writes: no model needed."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvchat.atomic_file import leftover_temp_files, write_atomically
from kvchat.engine import state_file
from kvchat.engine.state_file import CACHE_ENTRY, CONVERSATION, MAX_HEADER_BYTES, StateFileError

LAYOUT = "layout-a"


def write_conversation(path: Path, tokens: list[int] = [1, 2, 3], state: bytes = b"kv-bytes") -> int:  # noqa: B006 - read only
    return state_file.write(path, CONVERSATION, layout_key=LAYOUT, tokens=tokens, state=state, pending=[4])


def raw_file(kind: state_file.FileKind, header: object, state: bytes = b"", *, length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return kind.magic + struct.pack("<HI", state_file.FORMAT_VERSION, len(body) if length is None else length) + body + state


def test_round_trip_of_both_kinds(tmp_path: Path) -> None:
    size = write_conversation(tmp_path / "c.kvconv")
    read = state_file.read(tmp_path / "c.kvconv", CONVERSATION, layout_key=LAYOUT)
    assert (read.tokens, read.header["pending"], read.state, read.file_size) == ((1, 2, 3), [4], b"kv-bytes", size)
    state_file.write(tmp_path / "e.kvstate", CACHE_ENTRY, layout_key=LAYOUT, tokens=(5,), state=b"x", namespace=None)
    entry = state_file.read(tmp_path / "e.kvstate", CACHE_ENTRY, layout_key=LAYOUT, load=False)
    assert entry.tokens == (5,) and entry.header["namespace"] is None and entry.state is None


def test_a_file_of_the_other_kind_is_refused(tmp_path: Path) -> None:
    write_conversation(tmp_path / "c")
    with pytest.raises(StateFileError, match="magic") as caught:
        state_file.read(tmp_path / "c", CACHE_ENTRY, layout_key=LAYOUT)
    assert caught.value.problem == "header"


def test_another_layout_is_foreign(tmp_path: Path) -> None:
    write_conversation(tmp_path / "c")
    with pytest.raises(StateFileError) as caught:
        state_file.read(tmp_path / "c", CONVERSATION, layout_key="another model")
    assert caught.value.problem == "foreign"


@pytest.mark.parametrize("missing", ["layout_key", "tokens", "state_size", "state_sha256", "pending"])
def test_a_missing_header_field_is_a_typed_error_not_a_key_error(tmp_path: Path, missing: str) -> None:
    header = {"layout_key": LAYOUT, "tokens": [1], "pending": [], "state_size": 0, "state_sha256": "0" * 64}
    del header[missing]
    (tmp_path / "c").write_bytes(raw_file(CONVERSATION, header))
    with pytest.raises(StateFileError, match="missing or malformed") as caught:
        state_file.read(tmp_path / "c", CONVERSATION, layout_key=LAYOUT)
    assert caught.value.problem == "header"


@pytest.mark.parametrize("bad", [
    {"tokens": [1, -2]}, {"tokens": [1, "2"]}, {"tokens": [True]}, {"tokens": "123"}, {"pending": {"a": 1}},
    {"state_size": -1}, {"state_size": 1.5}, {"state_sha256": "short"}, {"layout_key": 7},
])
def test_malformed_header_fields_are_refused(tmp_path: Path, bad: dict[str, object]) -> None:
    header = {"layout_key": LAYOUT, "tokens": [1], "pending": [], "state_size": 0, "state_sha256": "0" * 64, **bad}
    (tmp_path / "c").write_bytes(raw_file(CONVERSATION, header))
    with pytest.raises(StateFileError, match="missing or malformed"):
        state_file.read(tmp_path / "c", CONVERSATION, layout_key=LAYOUT)


def test_a_huge_header_length_is_refused_before_reading_it(tmp_path: Path) -> None:
    (tmp_path / "c").write_bytes(raw_file(CONVERSATION, {}, length=MAX_HEADER_BYTES + 1))
    with pytest.raises(StateFileError, match="implausible"):
        state_file.read(tmp_path / "c", CONVERSATION, layout_key=LAYOUT)


def test_a_deeply_nested_header_is_refused(tmp_path: Path) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "c").write_bytes(CONVERSATION.magic + struct.pack("<HI", 1, len(body)) + body)
    with pytest.raises(StateFileError, match="not valid JSON"):
        state_file.read(tmp_path / "c", CONVERSATION, layout_key=LAYOUT)


def test_truncated_and_damaged_state_are_data_problems(tmp_path: Path) -> None:
    path = tmp_path / "c"
    write_conversation(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(StateFileError, match="truncated") as caught:
        state_file.read(path, CONVERSATION, layout_key=LAYOUT)
    assert caught.value.problem == "data"
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(StateFileError, match="checksum"):
        state_file.read(path, CONVERSATION, layout_key=LAYOUT)
    state_file.read(path, CONVERSATION, layout_key=LAYOUT, load=False)  # only the state is bad


def test_a_missing_file_is_an_io_problem(tmp_path: Path) -> None:
    with pytest.raises(StateFileError) as caught:
        state_file.read(tmp_path / "nothing", CONVERSATION, layout_key=LAYOUT)
    assert caught.value.problem == "io"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(0, 400))
def test_arbitrary_bytes_never_raise_anything_but_state_file_error(tmp_path_factory: pytest.TempPathFactory,
                                                                   data: bytes, cut: int) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c"
    good = state_file.header_bytes(CONVERSATION, layout_key=LAYOUT, tokens=[1, 2], state=b"abc", pending=[]) + b"abc"
    for candidate in (data, CONVERSATION.magic + data, good[:cut] + data):
        path.write_bytes(candidate)
        try:
            state_file.read(path, CONVERSATION, layout_key=LAYOUT)
        except StateFileError:
            pass


# -- atomic writes -------------------------------------------------------------------------------------


def test_atomic_write_syncs_the_file_and_then_its_directory(tmp_path: Path) -> None:
    synced: list[str] = []

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        os.fsync(fd)

    write_atomically(tmp_path / "f", b"one", b"two", fsync=recording_fsync)
    assert (tmp_path / "f").read_bytes() == b"onetwo"
    assert synced == ["file", "dir"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.kvstate"
    write_atomically(target, b"old")

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new", replace=fail)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target] and leftover_temp_files(tmp_path, ".kvstate") == []
