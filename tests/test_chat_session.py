"""ChatSession on the real Qwen model: each operation costs only the tokens after the first change."""

from __future__ import annotations

import os
import re
import uuid

import pytest

from kvchat import ChatSession, Engine, InvalidRequestError, SamplingParams
from kvchat.chat import ChatRuntime, ChatTokenizer, GeneratedTokenMemory, chat_tokenizer

QUESTIONS = ["Name a colour.", "Name a fruit.", "Name a country.", "Name a planet.", "Name a metal.",
             "Name a river."]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def session(qwen_engine: Engine) -> ChatSession:
    """A session after 6 turns, in its own cache namespace."""
    chat = ChatSession(qwen_engine, system="Answer with one word.", cache_key=f"session-{uuid.uuid4()}",
                       sampling=SamplingParams(temperature=0, max_tokens=8))
    for question in QUESTIONS:
        chat.send(question).collect()
    assert len(chat.history) == 13
    return chat


def prompt_of(session: ChatSession) -> list[int]:
    return session.chat_runtime.tokenizer.encode(session.messages, namespace=session.cache_key)


def test_edit_then_send_evaluates_from_the_edited_message_on(session: ChatSession) -> None:
    session.send("Name a bird.").collect()
    last_prompt = prompt_of(session)[:]  # includes the reply now; what the KV holds is its prefix
    session.edit(1, "Name a shade of blue.")
    reply = session.send("Name a tree.")
    new_prompt = prompt_of(session)
    done = reply.collect()
    start_of_message_1 = common_prefix(new_prompt, last_prompt)
    assert done.usage.cached_tokens == start_of_message_1
    assert done.usage.evaluated_tokens == done.usage.prompt_tokens - start_of_message_1
    system_only = session.chat_runtime.tokenizer.encode(session.messages[:1], add_generation_prompt=False,
                                                        namespace=session.cache_key)
    assert start_of_message_1 >= len(system_only)  # nothing before message 1 was evaluated again


def test_regenerate_evaluates_only_the_prompt_tail_and_replaces_the_answer(session: ChatSession) -> None:
    before = session.history
    done = session.regenerate().collect()
    assert done.usage.evaluated_tokens == 1  # at least one prompt token is always evaluated
    assert done.usage.cached_tokens == done.usage.prompt_tokens - 1
    assert len(session.history) == len(before)  # replaced, not appended
    assert session.history[:-1] == before[:-1]


def test_undo_then_send_keeps_the_earlier_turns(session: ChatSession) -> None:
    turn_six_prompt = session.chat_runtime.tokenizer.encode(session.messages[:-1], namespace=session.cache_key)
    session.undo()
    assert len(session.history) == 11
    reply = session.send("Name a mountain.")
    new_prompt = prompt_of(session)
    done = reply.collect()
    assert done.usage.cached_tokens == common_prefix(new_prompt, turn_six_prompt)
    assert done.usage.evaluated_tokens < 20  # only the new user turn and its template text


def test_delete_the_last_exchange_frees_nothing_it_should_keep(session: ChatSession) -> None:
    turn_six_prompt = session.chat_runtime.tokenizer.encode(session.messages[:-1], namespace=session.cache_key)
    session.delete(-1)
    session.delete(-1)
    assert len(session.history) == 11
    reply = session.send("Name a mountain.")
    new_prompt = prompt_of(session)
    done = reply.collect()
    assert done.usage.cached_tokens == common_prefix(new_prompt, turn_six_prompt)
    assert done.usage.evaluated_tokens < 20


def test_fork_save_load_and_errors(session: ChatSession, tmp_path) -> None:
    branch = session.fork()
    branch.send("Name a flower.").collect()
    assert len(branch.history) == len(session.history) + 2
    path = tmp_path / "chat.json"
    session.save(path)
    loaded = ChatSession.load(session.engine, path, cache_key=session.cache_key,
                              sampling=SamplingParams(temperature=0, max_tokens=8))
    assert loaded.history == session.history
    done = loaded.send("Name an ocean.").collect()
    assert done.usage.evaluated_tokens < 20  # the cache still holds the history
    with pytest.raises(InvalidRequestError):
        session.edit(99, "x")
    fresh = ChatSession(session.engine)
    with pytest.raises(InvalidRequestError):
        fresh.regenerate()
    with pytest.raises(InvalidRequestError):
        fresh.undo()


def test_a_session_chats_on_the_runtime_it_is_given_and_its_forks_share_it(qwen_engine: Engine) -> None:
    memory = GeneratedTokenMemory()
    runtime = ChatRuntime(qwen_engine, ChatTokenizer(qwen_engine.model, memory=memory))
    chat = ChatSession(qwen_engine, chat_runtime=runtime, cache_key=f"session-{uuid.uuid4()}",
                       sampling=SamplingParams(temperature=0, max_tokens=4))
    reply = chat.send("Name a colour.").collect()
    assert reply.content and memory.lookup(reply.content, namespace=chat.cache_key) is not None
    assert chat.fork().chat_runtime is runtime
    # Without one, a session uses the engine's shared runtime, as complete(engine, ...) does.
    assert ChatSession(qwen_engine).chat_runtime.tokenizer is chat_tokenizer(qwen_engine)


# -- /load and /save of damaged files and bad paths -------------------------------------------------


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_text('{"format": "kvchat-chat-session/1", "messages": [}'), "not valid JSON"),
    (lambda p: p.write_text(nested_lists(100_000)), "nested more than 32 levels"),
    (lambda p: p.write_text('{"format": "kvchat-chat-session/1", "messages": ' + nested_lists(40) + "}"),
     "nested more than 32 levels"),
    (lambda p: os.truncate(p.touch() or p, 1 << 30), "more than the 16777216 bytes"),  # 1 GiB, sparse
    (lambda p: None, "No such file or directory"),
    (lambda p: p.mkdir(), "it is a directory"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_bytes(b"\xff\xfe{}"), "not UTF-8"),
    (lambda p: p.write_text('{"messages": []}'), "not a kvchat chat session file"),
    (lambda p: p.write_text("[1, 2]"), "not a kvchat chat session file"),
    (lambda p: p.write_text('{"format": "kvchat-chat-session/1", "messages": [1]}'), "message 1 is not an object"),
    (lambda p: p.write_text('{"format": "kvchat-chat-session/1", "messages": [{"role": "user", "content": 5}]}'),
     "message 1's 'content'"),
], ids=["malformed", "100000-nested-lists", "nested-messages", "huge", "missing", "directory", "fifo", "not-utf8",
        "no-format", "not-an-object", "bad-message", "bad-content"])
def test_load_of_a_bad_file_says_why_and_changes_nothing(qwen_engine: Engine, tmp_path, write, message: str) -> None:
    path = tmp_path / "chat.json"
    write(path)
    kept = ChatSession(qwen_engine, system="Be brief.", messages=[{"role": "user", "content": "Hi"}])
    before = kept.history
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as raised:
        ChatSession.load(qwen_engine, path)
    assert raised.value.field == "path" and str(path) in str(raised.value)
    assert kept.history == before


def test_load_refuses_a_file_over_max_bytes(qwen_engine: Engine, tmp_path) -> None:
    path = tmp_path / "chat.json"
    ChatSession(qwen_engine, messages=[{"role": "user", "content": "x" * 1000}]).save(path)
    assert len(ChatSession.load(qwen_engine, path).messages) == 1
    with pytest.raises(InvalidRequestError, match="more than the 100 bytes"):
        ChatSession.load(qwen_engine, path, max_bytes=100)


def test_save_to_a_path_that_cannot_be_written_leaves_no_file(qwen_engine: Engine, tmp_path) -> None:
    session = ChatSession(qwen_engine, system="Be brief.", messages=[{"role": "user", "content": "Hi"}])
    before = session.history
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.txt").write_text("untouched")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for path, reason in [(folder, "it is a directory"), (blocker / "chat.json", "cannot save the chat to")]:
        with pytest.raises(InvalidRequestError, match=reason) as raised:
            session.save(path)
        assert raised.value.field == "path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder"]  # no temporary file left
    assert [p.name for p in folder.iterdir()] == ["inside.txt"] and blocker.read_text() == "not a folder"
    assert session.history == before
    session.save(tmp_path / "chat.json")  # the session still saves where it can
    assert ChatSession.load(qwen_engine, tmp_path / "chat.json").history == before
