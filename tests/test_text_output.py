"""TextOutput: UTF-8 safe deltas and stop strings (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvchat.engine.text_output import TextOutput


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(st.text(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_any_split_of_valid_utf8_streams_back_exactly(text: str, cuts: list[int]) -> None:
    out = TextOutput()
    deltas = [out.push(piece).text for piece in split_bytes(text.encode("utf-8", "surrogatepass"), cuts)]
    deltas.append(out.finish().text)
    if "\ud800" <= max(text, default="a") and any("\ud800" <= c <= "\udfff" for c in text):
        return  # lone surrogates are not valid UTF-8; covered by the replacement test below
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_split_emoji_is_held_until_complete() -> None:
    out = TextOutput()
    data = "a🐱b".encode()
    assert out.push(data[:2]).text == "a"  # 'a' plus the first byte of the emoji
    assert out.push(data[2:4]).text == ""
    assert out.push(data[4:]).text == "🐱b"


def test_incomplete_tail_becomes_replacement_at_finish() -> None:
    out = TextOutput()
    assert out.push("é".encode()[:1]).text == ""
    assert out.finish().text == "\ufffd"


def stream_through(out: TextOutput, data: bytes, cuts: list[int]) -> tuple[str, bool]:
    """Push `data` split at `cuts` through `out`, then finish: (text released, whether a stop string ended it)."""
    released = ""
    for piece in split_bytes(data, cuts):
        delta = out.push(piece)
        released += delta.text
        if delta.stopped:
            return released, True
    delta = out.finish()
    return released + delta.text, delta.stopped


@given(st.text(min_size=0, max_size=30), st.text(min_size=1, max_size=6), st.text(max_size=30),
       st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_stop_string_cuts_output_and_never_leaks(before: str, stop: str, after: str, cuts: list[int]) -> None:
    full = before + stop + after
    released, stopped = stream_through(TextOutput([stop]), full.encode(), cuts)
    first = full.find(stop)
    assert stopped
    assert released == full[:first]
    assert stop not in released


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end() -> None:
    out = TextOutput(["STOP"])
    assert out.push(b"abc ST").text == "abc "
    assert out.finish().text == "ST"


def test_after_stop_nothing_more_is_released() -> None:
    out = TextOutput(["x"])
    assert out.push(b"axb").text == "a"
    assert out.push(b"more") .text == ""
    assert out.finish().stopped


def _reference_cut(full: str, stops: list[str]) -> int | None:
    """Where the output ends: before the stop string that ends first (the longer on a tie)."""
    ends = [(full.find(s) + len(s), -len(s)) for s in stops if s in full]
    if not ends:
        return None
    end, minus_length = min(ends)
    return end + minus_length


@given(st.text(alphabet="ab\u00e9\U0001f600", max_size=40),
       st.lists(st.text(alphabet="ab\u00e9\U0001f600", min_size=1, max_size=5), min_size=1, max_size=4),
       st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_many_stop_strings_cut_where_the_first_one_ends_for_any_token_split(
    full: str, stops: list[str], cuts: list[int]
) -> None:
    released, stopped = stream_through(TextOutput(stops), full.encode(), cuts)
    cut = _reference_cut(full, stops)
    assert stopped == (cut is not None)
    assert released == (full if cut is None else full[:cut])


def test_a_long_self_similar_stop_string_is_found_after_a_near_miss() -> None:
    stop = "a" * 999 + "b"
    out = TextOutput([stop] * 16)
    released = "".join(out.push(b"a" * 37).text for _ in range(100))  # 3,700 a's: a partial match all along
    assert released == "a" * (3700 - 999)  # only the last 999 could still start the stop string
    delta = out.push(b"b tail")
    assert delta.stopped and released + delta.text == "a" * (3700 - 999)
