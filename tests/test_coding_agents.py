"""The real coding-agent CLIs against `kvchat serve`: Codex (`codex exec`, Responses API)
and Claude Code (`claude -p`, Anthropic's Messages API), run as they ship (their own
system prompts and tools), pinned in agents/ and installed by `make agents-setup`; `make test-agents` runs them.

Each test gives its CLI a throwaway work directory holding notes.txt and a prompt that
needs a tool call, then checks, from the server's access log, that the CLI made at
least two model calls (the tool call, then the answer after its result), that the CLI
exited 0 with no protocol error, and that the CLI's own usage shows the later call's
prompt coming from kvchat's prefix cache. The harness (config dirs, offline settings,
output parsing) is in agent_clis.py; what the CLIs send is described in tests/data/.

The first model call of each CLI is a long prompt (Codex ~8.6k tokens, Claude Code
~11.7k with Qwen's tokenizer). Prefill slows as the context grows: measured 80 tokens
per CPU-second for the first 1k tokens, 48 over the whole 8.6k, so some 1.5 minutes
(Codex) and 2-2.5 minutes (Claude Code) on two free cores, several times that on a
busy machine (Codex gives up on a stream after 300 s without an event). The later
calls are cached but for the new turn.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import agent_clis
import pytest
from agent_clis import MODEL, AgentRun
from http_server import ServeProcess

pytestmark = [pytest.mark.system, pytest.mark.agents, pytest.mark.timeout(1200)]  # RUN_TIMEOUT, plus the server's start

CTX_SIZE = 32768  # Qwen2.5-Coder's trained context; the CLIs' prompts are 9-12k tokens before any tool output
# Most tokens one reply may have (Claude Code asks for 32000, which the Messages API clamps to this):
# a tool call or a short answer needs far fewer, and a 0.5B model that loops (seen: the same
# made-up tool call again and again in one reply) decodes only a few tokens a second at this
# context on two cores.
MAX_TOKENS = 512
RUN_TIMEOUT = 900  # seconds per CLI run: one uncached prefill of ~10k tokens, cached later calls, generation
NOTES = "kumquat is the first word of this file.\n"

# Worded for a 0.5B model: "Run `cat notes.txt` ... and tell me the first word" got the answer "cat"
# (the command's first word) in 5 of 5 tries against the full Codex prompt; this wording got a
# tool call in 3 of 4.
CODEX_PROMPT = "Use exec_command to run `cat notes.txt`. Then answer: what is the first word written inside notes.txt?"
CLAUDE_PROMPT = (
    "Use the Bash tool to run `cat notes.txt`. Then answer: what is the first word written inside notes.txt?"
)

# Phrases of a failed exchange in either CLI's output (see tests/data/README.md for the real ones).
PROTOCOL_ERRORS = (
    "stream disconnected",
    "unexpected status",
    "Reconnecting...",
    "API Error",
    "exceeded retry limit",
    "invalid_request_error",
    "not_found_error",
    "InputValidationError",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServeProcess:
    why = agent_clis.missing()
    if why is not None:
        pytest.fail(why, pytrace=False)  # make test-agents installs them: a missing CLI is a broken set-up
    log = tmp_path_factory.mktemp("coding-agents") / "serve.log"
    serve = ServeProcess(
        "--model", MODEL, "--any-model", "--ctx-size", str(CTX_SIZE), "--max-tokens", str(MAX_TOKENS), log_path=str(log)
    )
    with serve:
        yield serve


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text(NOTES)
    return work


def _access_log(server: ServeProcess) -> list[dict]:
    entries = []
    for line in server.log().splitlines():
        if line.startswith("{") and '"http_request"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


def _model_requests(server: ServeProcess, since: int, path: str) -> list[dict]:
    """The access-log entries of `POST path` after the first `since` entries. A
    request is logged when its response ends, which can be just after the CLI exits:
    wait until the count holds still for a second."""
    seen, steady_since = None, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        calls = [e for e in _access_log(server)[since:] if e.get("method") == "POST" and e.get("path") == path]
        if len(calls) != seen:
            seen, steady_since = len(calls), time.monotonic()
        elif time.monotonic() - steady_since >= 1:
            break
        time.sleep(0.2)
    return calls


def _check(run: AgentRun, server: ServeProcess, calls: list[dict], path: str) -> None:
    summary = f"{run.describe()}\n  server {path} requests: {calls}\n  server log (tail):\n{server.log()[-4000:]}"
    assert not run.timed_out, f"{run.cli} did not finish in {RUN_TIMEOUT}s\n{summary}"
    assert run.exit_code == 0, f"{run.cli} exited {run.exit_code}\n{summary}"
    assert not run.errors, f"{run.cli} reported errors\n{summary}"
    output = run.stdout + run.stderr
    found = [phrase for phrase in PROTOCOL_ERRORS if phrase in output]
    assert not found, f"{run.cli}'s output has {found}\n{summary}"
    # A tool call and its result, then the answer: two model calls or more, all answered 200.
    assert len(calls) >= 2, f"the server saw {len(calls)} {path} request(s), expected >= 2\n{summary}"
    assert all(c.get("status") == 200 for c in calls), f"a {path} request failed\n{summary}"
    assert run.tool_calls, f"{run.cli} ran no tool\n{summary}"
    assert run.final_text, f"{run.cli} gave no final answer\n{summary}"
    # The CLI's own usage: the later call re-sends the first call's prompt, which kvchat has cached.
    assert len(run.calls) >= 2, f"{run.cli}'s session file shows {len(run.calls)} model call(s)\n{summary}"
    first, later = run.calls[0], run.calls[1]
    assert later.cached_input_tokens >= first.input_tokens // 2, (
        f"the second call's cached input tokens ({later.cached_input_tokens}) do not cover the first "
        f"call's prompt ({first.input_tokens} tokens)\n{summary}"
    )
    assert run.usage is not None and run.usage.cached_input_tokens > 0, f"no cached tokens in the total\n{summary}"


def test_codex_exec_runs_a_tool_through_the_responses_api(server: ServeProcess, tmp_path: Path) -> None:
    since = len(_access_log(server))
    run = agent_clis.run_codex(
        server.url, _workdir(tmp_path), CODEX_PROMPT, home=tmp_path / "home", timeout=RUN_TIMEOUT
    )
    calls = _model_requests(server, since, "/v1/responses")
    _check(run, server, calls, "/v1/responses")


def test_claude_code_runs_a_tool_through_the_messages_api(server: ServeProcess, tmp_path: Path) -> None:
    since = len(_access_log(server))
    run = agent_clis.run_claude(
        server.url, _workdir(tmp_path), CLAUDE_PROMPT, home=tmp_path / "home", timeout=RUN_TIMEOUT
    )
    calls = _model_requests(server, since, "/v1/messages")
    _check(run, server, calls, "/v1/messages")
