"""Conversation (token level) on the real Gemma model: fork, rewind, shift, save/load."""

from __future__ import annotations

import json
import struct

import pytest
from helpers import wait_idle

from kvchat import ConversationFileError, Engine, EngineSettings, InvalidRequestError, SamplingParams
from kvchat.engine import state_file
from kvchat.engine.state_file import CONVERSATION
from kvchat.llama import Model

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


@pytest.fixture(scope="module")
def engine(gemma_model: Model) -> Engine:
    with Engine(gemma_model, EngineSettings(n_ctx=2048, max_running=4, n_seq_max=8)) as engine:
        yield engine
        stats = wait_idle(engine)
        assert stats.free_sequences + stats.parked_sequences == 8  # no conversation leaked


def cold(cold_engine: Engine, tokens: list[int], n: int) -> tuple[int, ...]:
    return cold_engine.submit(tokens, greedy(n)).collect().token_ids


def test_generate_then_continue_matches_a_cold_run(engine: Engine, idle_cold_engine: Engine) -> None:
    with engine.conversation() as conv:
        conv.prompt(COUNTING)
        first = conv.generate(greedy(6)).collect()
        assert first.usage.finish_reason == "length" and len(first.token_ids) == 6
        assert conv.tokens + conv.pending == engine.model.tokenize(COUNTING, add_special=True) + list(first.token_ids)
        assert conv.pending == [first.token_ids[-1]]  # sampled, not evaluated yet
        second = conv.generate(greedy(6)).collect()
        prompt = engine.model.tokenize(COUNTING, add_special=True)
        # Only the first reply's last token (sampled, never evaluated) is new to the KV.
        assert (second.usage.cached_tokens, second.usage.evaluated_tokens) == (len(prompt) + 5, 1)
        assert first.token_ids + second.token_ids == cold(idle_cold_engine, prompt, 12)


def test_fork_shares_cells_and_both_branches_continue(engine: Engine, idle_cold_engine: Engine) -> None:
    with engine.conversation() as root:
        root.prompt(COUNTING)
        root.generate(greedy(4)).collect()
        before = wait_idle(engine).tokens_resident
        assert before >= len(root.tokens)  # the conversation's cells are counted
        with root.fork() as branch:
            assert wait_idle(engine).tokens_resident == before  # the fork copied nothing
            assert branch.tokens == root.tokens and branch.pending == root.pending
            root.prompt(" 20, 21,")
            branch.prompt(" 100, 101,")
            streams = [root.generate(greedy(6)), branch.generate(greedy(6))]  # decoded together
            results = [s.collect() for s in streams]
            for conv, result in zip((root, branch), results):
                history = conv.tokens + conv.pending
                prompt = history[: len(history) - len(result.token_ids)]
                assert result.token_ids == cold(idle_cold_engine, prompt, 6)


def test_rewind_then_reprompt_matches_a_cold_run(engine: Engine, idle_cold_engine: Engine) -> None:
    with engine.conversation() as conv:
        conv.prompt(COUNTING)
        conv.generate(greedy(8)).collect()
        conv.rewind(5)
        conv.prompt(" 9,")
        history = conv.tokens + conv.pending
        after = conv.generate(greedy(8)).collect()
        assert after.usage.cached_tokens == len(history) - len(engine.model.tokenize(" 9,"))
        assert after.token_ids == cold(idle_cold_engine, history, 8)


def test_shift_left_keeps_generating(engine: Engine) -> None:
    with engine.conversation() as conv:
        conv.prompt(COUNTING + " 9, 10, 11, 12, 13, 14, 15, 16,")
        conv.generate(greedy(4)).collect()
        before = conv.tokens
        conv.shift_left(1, 10)
        assert conv.tokens == before[:1] + before[11:]
        pending = conv.pending
        done = conv.generate(greedy(8)).collect()
        assert done.usage.finish_reason == "length" and len(done.token_ids) == 8
        assert done.text.strip()
        # It generated on the shifted KV: nothing resident was evaluated again, only the pending token.
        assert (done.usage.cached_tokens, done.usage.evaluated_tokens) == (len(before) - 10, len(pending))
        assert conv.tokens + conv.pending == before[:1] + before[11:] + pending + list(done.token_ids)


def test_save_and_load_continue_with_identical_tokens(engine: Engine, tmp_path) -> None:
    path = tmp_path / "conv.kvchat"
    with engine.conversation() as conv:
        conv.prompt(COUNTING)
        conv.generate(greedy(4)).collect()
        conv.save(path)
        with engine.load_conversation(path) as loaded:
            assert loaded.tokens == conv.tokens and loaded.pending == conv.pending
            a = conv.generate(greedy(8)).collect().token_ids
            b = loaded.generate(greedy(8)).collect().token_ids
    assert a == b


def test_a_file_from_another_model_or_damaged_is_refused(engine: Engine, qwen_engine: Engine, tmp_path) -> None:
    path = tmp_path / "gemma.kvchat"
    with engine.conversation() as conv:
        conv.prompt(COUNTING)
        conv.generate(greedy(2)).collect()
        conv.save(path)
    with pytest.raises(ConversationFileError, match="another model"):
        qwen_engine.load_conversation(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConversationFileError):
        engine.load_conversation(path)


@pytest.mark.parametrize("tamper", [lambda t: t[:-1], lambda t: [*t, t[-1]], lambda t: t[:3], lambda t: []],
                         ids=["one-fewer", "one-more", "much-fewer", "none"])
def test_a_file_whose_tokens_do_not_match_its_state_is_refused(engine: Engine, tmp_path, tamper) -> None:
    path = tmp_path / "conv.kvchat"
    with engine.conversation() as conv:
        conv.prompt(COUNTING)
        conv.generate(greedy(4)).collect()
        conv.save(path)
    data = path.read_bytes()  # magic, version, header length, JSON header, state bytes
    length = struct.unpack_from("<HI", data, len(CONVERSATION.magic))[1]
    start = len(CONVERSATION.magic) + 6
    header, state = json.loads(data[start:start + length]), data[start + length:]
    # A well-formed file (valid header, matching checksum) whose token list was edited.
    state_file.write(path, CONVERSATION, layout_key=header["layout_key"], tokens=tamper(header["tokens"]),
                     state=state, pending=header["pending"])
    before = wait_idle(engine)
    with pytest.raises(ConversationFileError, match="tokens"):
        engine.load_conversation(path)
    after = wait_idle(engine)  # nothing leaked: no sequence id, no cell
    assert (after.free_sequences, after.tokens_resident) == (before.free_sequences, before.tokens_resident)
    state_file.write(path, CONVERSATION, layout_key=header["layout_key"], tokens=header["tokens"],
                     state=state, pending=header["pending"])
    with engine.load_conversation(path) as loaded:  # the untouched file still loads
        assert loaded.tokens == header["tokens"]


def test_closed_and_busy_conversations_give_clear_errors(engine: Engine, tmp_path) -> None:
    conv = engine.conversation()
    conv.prompt(COUNTING)
    stream = conv.generate(greedy(32))
    # While it generates, every call that needs it idle says so (the stream is still consumable).
    for call in (lambda: conv.generate(greedy(2)), lambda: conv.prompt("more"), conv.fork, lambda: conv.rewind(1),
                 lambda: conv.shift_left(1, 2), lambda: conv.save(tmp_path / "busy.kvchat"), conv.close):
        with pytest.raises(InvalidRequestError, match="generating"):
            call()
    assert not conv.closed
    stream.collect()
    conv.close()
    conv.close()
    assert conv.closed
    # Once closed, every call says so.
    for call in (lambda: conv.prompt("more"), lambda: conv.generate(greedy(2)), conv.fork, lambda: conv.rewind(1),
                 lambda: conv.shift_left(1, 2), lambda: conv.save(tmp_path / "closed.kvchat"), lambda: conv.tokens):
        with pytest.raises(InvalidRequestError, match="closed"):
            call()


def test_conversations_on_several_threads_at_once(engine: Engine, idle_cold_engine: Engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int) -> tuple[tuple[int, ...], list[int]]:
        with engine.conversation() as conv:
            conv.prompt(f"{i}, {i + 1}, {i + 2}, {i + 3},")
            history = conv.pending
            return conv.generate(greedy(8)).collect().token_ids, history

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [10, 20, 30, 40]))
    for tokens, history in results:
        assert len(tokens) == 8
        assert tokens == cold(idle_cold_engine, history, 8)
