"""Crash and restart: `kvchat serve` killed with SIGKILL under load, with the disk cache on.

One server runs with a small KV pool and no RAM tier (``--cache-ram 0``), so
conversations evicted from the pool land in ``--cache-dir`` at once. Six
conversations fill the disk tier; a second load keeps spilling while it is
killed with SIGKILL (no graceful shutdown, so ``Engine.close`` never persists
anything). Damaged files are planted next to the real ones, then a new server
starts on the same directory: it must come up, log and skip every bad file,
restore the conversations saved before the kill (``cached_tokens`` on its very
first request) and serve every conversation. A store-level test pins down the
write order that keeps a conversation's saved state through a kill mid-spill.
"""

from __future__ import annotations

import signal
import threading
from functools import partial
from pathlib import Path

import openai
import pytest
from http_server import ServeProcess

from kvchat.atomic_file import leftover_temp_files, write_atomically
from kvchat.engine.state_store import FILE_SUFFIX, SpilledState, StateStore

pytestmark = pytest.mark.system  # child processes (see tests/conftest.py)

MODEL = "gemma-3-270m"
USERS = 6  # conversations loaded before the kill
TURNS = 3
MAX_TOKENS = 8
# 4 KV sequence ids (2 x --parallel) for 6 conversations: finished conversations
# are evicted least recently used first, and with no RAM tier they go to disk.
SERVE_ARGS = ("--model", MODEL, "--ctx-size", "1024", "--parallel", "2", "--cache-ram", "0",
              "--max-tokens", "32", "--shutdown-grace", "5")

Message = dict[str, str]


def serve(cache_dir: Path, log_path: Path) -> ServeProcess:
    return ServeProcess(*SERVE_ARGS, "--cache-dir", str(cache_dir), log_path=str(log_path))


def state_files(cache_dir: Path) -> set[Path]:
    return set(cache_dir.glob(f"*{FILE_SUFFIX}"))


def temp_files(cache_dir: Path) -> set[Path]:
    return set(leftover_temp_files(cache_dir, FILE_SUFFIX))


def question(user: int, turn: int) -> Message:
    return {"role": "user", "content": f"I am user {user}. Question {turn}: name a fruit and a colour."}


def chat(client: openai.OpenAI, messages: list[Message]):
    """One greedy chat completion; returns the parsed reply after checking the HTTP status."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert raw.status_code == 200
    return raw.parse()


def take_turn(client: openai.OpenAI, history: list[Message], user: int, turn: int):
    """Send `history` plus a new question; on success append both sides to `history`."""
    messages = [*history, question(user, turn)]
    reply = chat(client, messages)
    history[:] = [*messages, {"role": "assistant", "content": reply.choices[0].message.content or ""}]
    return reply


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


class Load:
    """Conversations taking turns in background threads until the server goes away.

    `done` counts completed requests; a thread stops at its first failure (the
    kill), leaving its conversation's history as of its last completed turn.
    Failures before :meth:`kill_expected` go to `errors`.
    """

    def __init__(self, client: openai.OpenAI, histories: dict[int, list[Message]], first_turn: int) -> None:
        self.done = 0
        self.errors: list[BaseException] = []
        self.active = len(histories)  # threads still taking turns
        self._kill_expected = False
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._run, args=(client, histories[u], u, first_turn), daemon=True)
                         for u in histories]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, client: openai.OpenAI, history: list[Message], user: int, first_turn: int) -> None:
        try:
            for turn in range(first_turn, first_turn + 8):
                take_turn(client, history, user, turn)
                with self._progress:
                    self.done += 1
                    self._progress.notify_all()
        except Exception as exc:  # noqa: BLE001 - expected once the server is killed
            with self._lock:
                if not self._kill_expected:
                    self.errors.append(exc)
        finally:
            with self._progress:
                self.active -= 1
                self._progress.notify_all()

    def wait_until(self, condition, timeout: float = 120) -> bool:
        """Wait for `condition()` while any thread still runs; False if it never held."""
        with self._progress:
            return self._progress.wait_for(lambda: condition() or not self.active, timeout) and condition()

    def kill_expected(self) -> None:
        """From now on, failed requests are the kill's doing."""
        with self._lock:
            self._kill_expected = True

    def join(self) -> None:
        for thread in self._threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self._threads), "a load thread is stuck after the kill"


def plant_bad_files(cache_dir: Path, victim: Path) -> dict[str, Path]:
    """Damage the directory like a crash or a careless user could: returns the bad files by kind."""
    garbage = cache_dir / f"{'0' * 64}{FILE_SUFFIX}"
    garbage.write_bytes(b"\x00garbage, not a kvchat state file" * 8)
    victim.write_bytes(victim.read_bytes()[:-100])  # one of ours, its tail lost
    partial = cache_dir / f".{victim.name}.interrupted.tmp"  # as write_atomically names it
    partial.write_bytes(victim.read_bytes()[:50])
    return {"garbage": garbage, "truncated": victim, "temp": partial}


@pytest.mark.timeout(300)
def test_sigkill_under_load_then_restart_restores_the_disk_cache(tmp_path: Path) -> None:
    """Killed mid-load, restarted on the same (damaged) directory: starts, skips and
    logs the bad files, restores what was on disk, serves every conversation."""
    cache_dir = tmp_path / "kv-cache"
    histories: dict[int, list[Message]] = {u: [] for u in range(1, USERS + 1)}
    last_prompt: dict[int, list[Message]] = {}  # each conversation's last request, as sent
    last_prompt_tokens: dict[int, int] = {}

    first = serve(cache_dir, tmp_path / "first.log")
    try:
        client = first.start().client()
        # Phase 1, sequential (deterministic): conversations 1 and 2 are the least
        # recently used at the end, so their last turns are evicted to disk.
        for turn in range(1, TURNS + 1):
            for user, history in histories.items():
                last_prompt[user] = [*history, question(user, turn)]
                last_prompt_tokens[user] = take_turn(client, history, user, turn).usage.prompt_tokens
        saved_before_load = state_files(cache_dir)
        assert saved_before_load, "no KV state was spilled to disk during the load"

        # Phase 2: conversations 3-6 go on and 7-10 start, in parallel; conversations
        # 1 and 2 are left alone, so nothing rewrites or deletes their files.
        for user in range(USERS + 1, USERS + 5):
            histories[user] = []
        busy = {u: histories[u] for u in range(3, USERS + 5)}
        load = Load(client, busy, first_turn=TURNS + 1).start()
        spilled_under_load = load.wait_until(lambda: load.done >= 3 and state_files(cache_dir) - saved_before_load)
        assert spilled_under_load, f"the load ended before new state was spilled:\n{first.log()}"
        load.kill_expected()
        assert not load.errors, load.errors
        first.signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        load.join()
    finally:
        first.stop()

    # A file written under load belongs to conversations 3-10, never to 1 or 2.
    victim = min(state_files(cache_dir) - saved_before_load)
    bad = plant_bad_files(cache_dir, victim)

    second = serve(cache_dir, tmp_path / "second.log")
    try:
        client = second.start().client()
        # The very first request: conversation 1's last request again, word for word.
        # A fresh process holds no KV at all: every cached token came from disk, and
        # the earlier replies come back as the ids the model generated (the
        # generated-token journal beside the cache), so the prompt is the same.
        # All but the last prompt token (evaluated for fresh logits) are cached.
        again = chat(client, last_prompt[1])
        assert again.usage.prompt_tokens == last_prompt_tokens[1]
        assert cached(again) == last_prompt_tokens[1] - 1
        # Conversation 2 goes on: its whole previous prompt is restored (the template
        # may re-tokenize the boundary before the assistant's answer: one token of slack).
        reply = take_turn(client, histories[2], 2, TURNS + 1)
        assert cached(reply) >= last_prompt_tokens[2] - 1
        # Every conversation, including those cut off by the kill, is served.
        for user, history in histories.items():
            if user != 2:
                take_turn(client, history, user, len(history) // 2 + 1)
    finally:
        second.stop()

    log = second.log()
    assert second.process.returncode == -signal.SIGTERM and "Traceback" not in log, log
    assert f"skipping spilled KV state file {bad['garbage']}: bad magic bytes" in log
    assert f"skipping spilled KV state file {bad['truncated']}: file is " in log
    assert "(truncated or partial)" in log
    assert f"removing leftover temporary file {bad['temp']}" in log
    assert not bad["truncated"].exists()  # ours but partial: deleted
    assert bad["garbage"].exists()  # of unknown origin: left alone, never loaded
    assert not temp_files(cache_dir), "a temporary file outlived a clean shutdown"
    assert state_files(cache_dir) - {bad["garbage"]}, "the clean shutdown saved nothing"


class Killed(BaseException):
    """Stands for SIGKILL inside the store: nothing after the raise runs."""


def test_kill_while_a_conversation_is_re_spilled_keeps_its_saved_prefix(tmp_path: Path) -> None:
    """A longer entry replaces its saved prefix only once its own file is written:
    killed in between (here: in the fsync of the new file), the prefix survives.
    The stores write on this thread (`write_queue_bytes=None`) so that the kill
    reaches the test; tests/test_state_writer.py kills the writer thread instead."""
    turn_1 = SpilledState((1, 2, 3), None, b"state after turn 1")
    turn_2 = SpilledState((1, 2, 3, 4, 5), None, b"state after turn 2")
    StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key="L", write_queue_bytes=None).put(turn_1)

    def kill(fd: int) -> None:
        raise Killed

    store = StateStore(
        ram_budget_bytes=0,
        disk_dir=tmp_path,
        layout_key="L",
        write_queue_bytes=None,
        write_file=partial(write_atomically, fsync=kill),
    )
    with pytest.raises(Killed):
        store.put(turn_2)

    restarted = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key="L", write_queue_bytes=None)
    match = restarted.best_match([1, 2, 3, 4, 5, 6])
    assert match is not None and match.entry_tokens == turn_1.tokens
    assert restarted.load(match) == turn_1
    restarted.put(turn_2)  # written in full: the prefix's file goes
    assert len(state_files(tmp_path)) == 1
    assert restarted.load(restarted.best_match([1, 2, 3, 4, 5, 6])) == turn_2
