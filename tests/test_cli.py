"""The `kvchat` command, run as users run it (a child process, piped input)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kvchat.bench import run_benchmark

pytestmark = pytest.mark.system  # child processes (see tests/conftest.py)

KVCHAT = [sys.executable, "-m", "kvchat.cli"]
STATS = re.compile(r"prompt (\d+) · cached (\d+) · evaluated (\d+) · completion (\d+)")
GEMMA = ["--model", "gemma-3-270m", "--ctx-size", "2048", "--temperature", "0"]


def run_cli(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*KVCHAT, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_piped_chat_with_commands(tmp_path) -> None:
    saved = tmp_path / "chat.json"
    script = "\n".join([
        "Name three colours.",
        "/retry",
        "/edit 1 Name three animals.",
        "/system Answer in one line.",
        "/history",
        "/stats",
        f"/save {saved}",
        "/undo",
        f"/load {saved}",
        "/history",
        "/bogus",
        "/edit 99 nothing",
        "/quit",
        "never read",
    ]) + "\n"
    result = run_cli("chat", *GEMMA, "--max-tokens", "12", stdin=script)
    assert result.returncode == 0, result.stderr
    turns = [tuple(map(int, m)) for m in STATS.findall(result.stderr)]
    assert len(turns) == 3  # the first answer, /retry, /edit's new answer
    first, retry, edited = turns
    assert first[1] == 0 or first[1] < first[0]
    # /retry re-sends the same history: everything but the last prompt token is cached.
    assert retry[0] == first[0] and retry[2] == 1
    # /edit of message 1 re-evaluates from the change on (the template's opening stays cached).
    assert 0 < edited[1] < edited[0]
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert data["messages"][1]["content"] == "Name three animals."
    assert "unknown command /bogus" in result.stderr and "there is no message 99" in result.stderr
    assert "loaded 3 messages" in result.stderr and "never read" not in result.stdout
    assert "1 system" in result.stderr.replace("  ", " ")


def test_bad_load_and_save_print_an_error_and_keep_the_chat(tmp_path) -> None:
    saved, folder, blocker = tmp_path / "chat.json", tmp_path / "folder", tmp_path / "a-file"
    folder.mkdir()
    blocker.write_text("not a folder")
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"format": "kvchat-chat-session/1", "messages": [')
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB (sparse)
    script = "\n".join([
        "Name three colours.",
        f"/save {saved}",
        f"/load {malformed}",
        f"/load {nested}",
        f"/load {huge}",
        f"/load {tmp_path / 'missing.json'}",
        f"/load {folder}",
        f"/save {folder}",
        f"/save {blocker / 'chat.json'}",
        "/history",
        "Name three animals.",
        "/history",
        "/quit",
    ]) + "\n"
    result = run_cli("chat", *GEMMA, "--max-tokens", "8", stdin=script)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 7, result.stderr
    expected = [
        (malformed, "it is not valid JSON"),
        (nested, "its JSON is nested more than 32 levels deep"),
        (huge, "more than the 16777216 bytes a chat session file may have"),
        (tmp_path / "missing.json", "No such file or directory"),
        (folder, "it is a directory"),
    ]
    for line, (path, reason) in zip(errors[:5], expected, strict=True):
        assert line.startswith(f"error: cannot load a chat session from {path}: ") and reason in line, line
    assert errors[5] == f"error: cannot save the chat to {folder}: it is a directory"
    assert errors[6].startswith(f"error: cannot save the chat to {blocker / 'chat.json'}: ")
    # The chat went on with its history: the second question's prompt holds the first exchange, cached.
    turns = [tuple(map(int, m)) for m in STATS.findall(result.stderr)]
    assert len(turns) == 2 and turns[1][0] > turns[0][0] and turns[1][1] > turns[0][0] // 2
    history = re.findall(r"^\s*(\d+) (\w+)\s+(.*)$", result.stderr, flags=re.MULTILINE)
    assert [(n, role) for n, role, _ in history] == [
        ("1", "user"), ("2", "assistant"),  # the first /history
        ("1", "user"), ("2", "assistant"), ("3", "user"), ("4", "assistant"),  # after the second question
    ]
    assert history[0][2] == "Name three colours." and history[4][2] == "Name three animals."
    # No file was half-written: the directory and the file in the way are untouched, no temporary file.
    assert list(folder.iterdir()) == [] and blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file", "chat.json", "folder", "huge.json", "malformed.json", "nested.json"]
    assert len(json.loads(saved.read_text())["messages"]) == 2


def test_ctrl_c_stops_the_answer_and_keeps_the_chat() -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen([*KVCHAT, "chat", *GEMMA, "--max-tokens", "1500"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        process.stdin.write("Count from 1 to 3000, one number per line.\n")
        process.stdin.flush()
        # Wait until the answer is streaming, then interrupt it.
        assert process.stdout.readline()
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.stdin.write("/stats\n/quit\n")
        process.stdin.flush()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "[stopped]" in stdout
    assert time.monotonic() - started < 60  # far sooner than 1500 tokens
    completions = [int(m[3]) for m in STATS.findall(stderr)]
    assert len(completions) == 1 and 0 < completions[0] < 1500


def test_models_lists_the_packaged_models() -> None:
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    assert "qwen2.5-coder-0.5b-instruct" in result.stdout and "gemma-3-270m" in result.stdout


def test_bench_command_writes_a_chart(tmp_path) -> None:
    chart = tmp_path / "ttft.png"
    result = run_cli("bench", "--model", "gemma-3-270m", "--turns", "2", "--max-tokens", "4",
                     "--ctx-size", "1024", "--plot", str(chart))
    assert result.returncode == 0, result.stderr
    assert "TTFT on" in result.stdout and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("chat", "serve", "models", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("users", [1, 2])
def test_benchmark_cache_on_evaluates_only_new_tokens(gemma_model, users: int) -> None:
    results = run_benchmark(gemma_model, users=users, turns=3, max_tokens=4, n_ctx=2048)
    on, off = results["on"], results["off"]
    assert [t.prompt_tokens for t in on] == [t.prompt_tokens for t in off]  # same histories
    assert all(t.cached_tokens == 0 for t in off)
    for turn_on, turn_off in zip(on[1:], off[1:]):
        # Later turns: the cache holds each user's previous history.
        assert turn_on.evaluated_tokens < turn_off.evaluated_tokens / 2
        assert turn_on.cached_tokens + turn_on.evaluated_tokens == turn_on.prompt_tokens
    assert all(len(t.ttft) == users for t in on)
