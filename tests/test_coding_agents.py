"""The real coding-agent CLIs against `kvchat serve`: Codex (`codex exec`, Responses API)
and Claude Code (`claude -p`, Anthropic's Messages API), pinned in agents/ and installed
by `make agents-setup`; `make test-agents` runs them (and CI, after `make test`).

Each test gives its CLI a throwaway work directory holding notes.txt and a prompt that
needs a tool call. What is tested is the CLI's request flow against kvchat, not the
model's skill: the CLI parses a streamed tool call, runs the tool, sends its result
back in the next model call (read from kvchat's prefix cache), and ends its session
without a protocol error; every model call is answered 200.

The server runs at temperature 0 (`--temperature 0`: neither CLI sends one), so a run
follows the model's most likely choices. Qwen2.5-Coder 0.5B, probed here on
2026-12-07: it calls the tool when the prompt names it plainly, and after the tool's
result it calls the tool again rather than answer, on both CLIs and on a bare
two-message history too. So Codex ends its turn with an empty answer, and Claude Code
at `--max-turns`; both are accepted as the end of a session.

- Codex runs as it ships (its own instructions and tools, ~8.7k tokens with Qwen's
  tokenizer). Its first call takes 1.5-2 minutes on two cores; later ones are cached.
- Claude Code runs with `--tools Bash` and a one-line `--system-prompt`: with its own
  prompt and 12 tools (~11.7k tokens), the 0.5B model called no tool in 12 samples,
  and with `--tools Bash` alone it answered from the date in the prompt. Its full
  request shape is covered by the Messages API tests (tests/data/claude_request.json).
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
MAX_TOKENS = 256
RUN_TIMEOUT = 900  # seconds per CLI run: one uncached prefill of ~10k tokens, cached later calls, generation
NOTES = "kumquat is the first word of this file.\n"

# Worded for a 0.5B model at temperature 0, from its greedy output (probed offline on the
# 8.7k-token prompt): "Use exec_command to run `cat notes.txt`" got a call whose
# `justification` was that parameter's description, which Codex refuses. The model's first
# token is a near-tie (0.04 logits) between a fenced ```json call and a bare JSON one,
# which kvchat's parser both takes as calls; with this wording both set only `cmd`.
CODEX_PROMPT = (
    'Call exec_command with exactly these arguments: {"cmd": "cat notes.txt"}. Then tell me the first word of '
    "notes.txt."
)
# Its first token decides: '{"' (a call, which the model writes as bare JSON) led 'The' by
# 0.3 logits in the first wording tried, while this one leads the next choice ('```') by
# 2.7, whatever the working directory in Claude Code's prompt (probed: four paths).
CLAUDE_PROMPT = 'Call the tool named "Bash" with command `cat notes.txt`, then tell me the first word of notes.txt.'
CLAUDE_ARGS = (
    "--tools",
    "Bash",
    "--system-prompt",
    "You are a coding assistant in a terminal. Always use the Bash tool to run shell commands.",
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
        "--model",
        MODEL,
        "--any-model",
        "--ctx-size",
        str(CTX_SIZE),
        "--max-tokens",
        str(MAX_TOKENS),
        "--temperature",
        "0",
        log_path=str(log),
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
    assert not run.errors, f"{run.cli} reported errors\n{summary}"
    output = run.stdout + run.stderr
    found = [phrase for phrase in PROTOCOL_ERRORS if phrase in output]
    assert not found, f"{run.cli}'s output has {found}\n{summary}"
    # A tool call, then another model call with its result: two model calls or more, all answered 200.
    assert len(calls) >= 2, f"the server saw {len(calls)} {path} request(s), expected >= 2\n{summary}"
    assert all(c.get("status") == 200 for c in calls), f"a {path} request failed\n{summary}"
    # The CLI parsed the streamed call and ran the tool: its output is the file's text.
    assert any(NOTES.strip() in (call.output or "") for call in run.tool_calls), f"{run.cli} ran no tool\n{summary}"
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
    # The turn ended with an answer (the 0.5B model's may be empty) and Codex exited 0.
    assert run.final_text is not None and run.exit_code == 0, run.describe()


def test_claude_code_runs_a_tool_through_the_messages_api(server: ServeProcess, tmp_path: Path) -> None:
    since = len(_access_log(server))
    run = agent_clis.run_claude(
        server.url,
        _workdir(tmp_path),
        CLAUDE_PROMPT,
        home=tmp_path / "home",
        timeout=RUN_TIMEOUT,
        extra_args=CLAUDE_ARGS,
    )
    calls = _model_requests(server, since, "/v1/messages")
    _check(run, server, calls, "/v1/messages")
    # The session ended with an answer (exit 0) or at --max-turns, the model calling tools still.
    assert run.result is not None, run.describe()
    assert run.result.get("subtype") in ("success", "error_max_turns"), run.describe()
    assert run.exit_code == (0 if run.result["subtype"] == "success" else 1), run.describe()
