"""Run the real coding-agent CLIs (OpenAI's Codex, Anthropic's Claude Code) against a kvchat server.

The CLIs are pinned in agents/package.json and agents/package-lock.json;
`make agents-setup` installs them into agents/node_modules (`npm ci --prefix agents`). Each run gets its
own HOME and config directory (CODEX_HOME, CLAUDE_CONFIG_DIR), an environment built
from scratch (nothing of the caller's OPENAI_*/ANTHROPIC_*/proxy settings leaks in)
and settings that keep the CLI off the internet, so it talks only to `base_url`:

- Codex: `$CODEX_HOME/config.toml` with a `kvchat` model provider (`wire_api =
  "responses"`), `check_for_update_on_startup = false`, analytics, feedback and OTel
  export off, and `[features] plugins = false` (without it Codex contacts github.com,
  api.github.com and chatgpt.com at start; the prompt it sends is the same either way).
- Claude Code: `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1` (without it: api.anthropic.com),
  plus DISABLE_TELEMETRY, DISABLE_AUTOUPDATER, DISABLE_ERROR_REPORTING.

Runs are non-interactive and bounded, with the CLIs' prompts left as they ship:
`codex exec --dangerously-bypass-approvals-and-sandbox` (approval never, no sandbox:
the work directory is a throwaway one), `claude -p --permission-mode bypassPermissions
--max-turns N` (as root Claude Code refuses that mode unless IS_SANDBOX=1, set here
then), a wall-clock timeout that kills the CLI's process group, and by default no
client-side retries (`request_max_retries`/`stream_max_retries = 0`,
`CLAUDE_CODE_MAX_RETRIES=0`): a failing server shows at once instead of after
Codex's 30 tries (~25 s) or Claude Code's 11 (~3 minutes).

What each CLI sends was captured once; see tests/data/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
AGENTS_DIR = REPO / "agents"
BIN_DIR = AGENTS_DIR / "node_modules" / ".bin"
CODEX = BIN_DIR / "codex"
CLAUDE = BIN_DIR / "claude"
MODEL = "qwen2.5-coder-0.5b-instruct"
API_KEY = "kvchat-agent-test-key"  # any key: kvchat serve without --api-key takes every key
CODEX_KEY_ENV = "KVCHAT_API_KEY"  # the variable Codex's provider reads the key from (env_key)

# Non-fatal notices Codex reports as `error` items (the run goes on).
CODEX_NOTICES = ("Model metadata for",)

_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")


def pinned_versions() -> dict[str, str]:
    """The CLI versions agents/package.json pins (package name -> version)."""
    return json.loads((AGENTS_DIR / "package.json").read_text())["dependencies"]


def missing() -> str | None:
    """Why the CLIs cannot run on this machine, or None if they can."""
    if shutil.which("node") is None:
        return (
            "node is not on PATH: the coding-agent CLIs need Node.js (>= 20) and npm; "
            "install them, then run `make agents-setup` (it runs `npm ci --prefix agents`)"
        )
    for binary in (CODEX, CLAUDE):
        if not os.access(binary, os.X_OK):
            return f"{binary} is missing: run `make agents-setup` (it runs `npm ci --prefix agents --no-audit --no-fund`)"
    return None


@dataclass
class Usage:
    """Token counts as a CLI reported them, in one convention: `input_tokens` counts
    every prompt token, the cached ones included (Claude Code's `input_tokens`, which
    excludes cache reads and writes, is converted)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.output_tokens + other.output_tokens,
        )


@dataclass
class ToolCall:
    name: str  # Codex: the item type (command_execution, file_change, mcp_tool_call...); Claude: the tool
    arguments: str  # the command line, or the tool input as JSON
    output: str | None = None
    failed: bool | None = None  # non-zero exit / is_error, when the CLI says


@dataclass
class AgentRun:
    """One CLI run: what the process did and what the CLI reported."""

    cli: str
    argv: list[str]
    exit_code: int | None  # None: killed at the timeout
    duration_s: float
    stdout: str
    stderr: str
    final_text: str | None = None
    usage: Usage | None = None  # the CLI's total over the run (stdout)
    calls: list[Usage] = field(default_factory=list)  # per model call, from the CLI's session file
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # errors the CLI reported (HTTP, protocol, retries)
    notices: list[str] = field(default_factory=list)  # non-fatal notices (e.g. Codex's unknown-model metadata)
    result: dict[str, Any] | None = None  # Claude Code's JSON result
    events: list[dict[str, Any]] = field(default_factory=list)  # Codex's JSON events

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None

    @property
    def model_calls(self) -> int:
        """Model requests as the CLI recorded them (its session file); Claude Code's
        `num_turns` if that is all there is."""
        if self.calls:
            return len(self.calls)
        if self.result is not None:
            return int(self.result.get("num_turns") or 0)
        return 0

    def describe(self) -> str:
        """A summary for assertion messages."""
        lines = [
            f"{self.cli}: exit {self.exit_code}{' (timed out)' if self.timed_out else ''} "
            f"after {self.duration_s:.1f}s; model calls seen by the CLI: {self.model_calls}",
            f"  argv: {' '.join(self.argv[:3])} ...",
            f"  final text: {self.final_text!r}",
            f"  usage: {self.usage}; per call: {self.calls}",
            f"  tool calls ({len(self.tool_calls)}): {self.tool_calls[:10]}",
            f"  errors: {self.errors}",
            f"  notices: {self.notices}",
            f"  stdout (tail): {self.stdout[-3000:]}",
            f"  stderr (tail): {self.stderr[-3000:]}",
        ]
        return "\n".join(lines)


# -- running ----------------------------------------------------------------------------


def _base_env(home: Path) -> dict[str, str]:
    env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = str(home)
    # No proxy: a local base URL must not be sent through one (Codex would).
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


def _run(cli: str, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> AgentRun:
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI's own process group: node, its binary, its tools
        stdout, stderr = process.communicate()
        code = None
    return AgentRun(cli, argv, code, time.monotonic() - started, stdout, stderr)


def codex_config(base_url: str, *, retries: int = 0) -> str:
    """$CODEX_HOME/config.toml for a run against `base_url` (the server root, no /v1)."""
    return f"""\
model_provider = "kvchat"
model = "{MODEL}"
check_for_update_on_startup = false

[model_providers.kvchat]
name = "kvchat"
base_url = "{base_url.rstrip("/")}/v1"
wire_api = "responses"
env_key = "{CODEX_KEY_ENV}"
request_max_retries = {retries}
stream_max_retries = {retries}

[features]
plugins = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"
log_user_prompt = false
"""


def run_codex(
    base_url: str,
    workdir: Path,
    prompt: str,
    *,
    home: Path,
    timeout: float = 600,
    retries: int = 0,
    extra_args: tuple[str, ...] = (),
) -> AgentRun:
    """`codex exec --json` in `workdir` against kvchat at `base_url`; `home` (created)
    holds HOME and CODEX_HOME."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(base_url, retries=retries))
    env = _base_env(home)
    env["CODEX_HOME"] = str(codex_home)
    env[CODEX_KEY_ENV] = API_KEY
    argv = [
        str(CODEX),
        "exec",
        "--json",
        "--strict-config",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        *extra_args,
        prompt,
    ]
    run = _run("codex", argv, env, workdir, timeout)
    parse_codex_events(run)
    run.calls = codex_session_calls(codex_home)
    return run


def run_claude(
    base_url: str,
    workdir: Path,
    prompt: str,
    *,
    home: Path,
    timeout: float = 600,
    retries: int = 0,
    max_turns: int = 6,
    extra_args: tuple[str, ...] = (),
) -> AgentRun:
    """`claude -p --output-format json` in `workdir` against kvchat at `base_url`;
    `home` (created) holds HOME and CLAUDE_CONFIG_DIR."""
    config_dir = home / ".claude"
    config_dir.mkdir(parents=True, exist_ok=True)
    env = _base_env(home)
    env.update(
        {
            "CLAUDE_CONFIG_DIR": str(config_dir),
            "ANTHROPIC_BASE_URL": base_url.rstrip("/"),
            "ANTHROPIC_API_KEY": API_KEY,
            "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "CLAUDE_CODE_MAX_RETRIES": str(retries),
            "API_TIMEOUT_MS": str(int(timeout * 1000)),
        }
    )
    if os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"  # else: "--dangerously-skip-permissions cannot be used with root/sudo privileges"
    argv = [
        str(CLAUDE),
        "-p",
        prompt,
        "--model",
        MODEL,
        "--output-format",
        "json",
        "--max-turns",
        str(max_turns),
        "--permission-mode",
        "bypassPermissions",
        *extra_args,
    ]
    run = _run("claude", argv, env, workdir, timeout)
    parse_claude_result(run)
    claude_transcript(run, config_dir, (run.result or {}).get("session_id"))
    return run


# -- parsing ----------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def parse_codex_events(run: AgentRun) -> None:
    """Fill `run` from `codex exec --json` events (one JSON object per stdout line):
    thread.started, turn.started, item.started/updated/completed, turn.completed
    (usage), turn.failed, error."""
    run.events = _json_lines(run.stdout)
    total: Usage | None = None
    for event in run.events:
        kind = event.get("type")
        if kind == "item.completed":
            item = event.get("item") or {}
            item_type = item.get("type")
            if item_type == "agent_message":
                run.final_text = item.get("text")
            elif item_type == "error":
                message = str(item.get("message"))
                (run.notices if message.startswith(CODEX_NOTICES) else run.errors).append(message)
            elif item_type == "command_execution":
                exit_code = item.get("exit_code")
                run.tool_calls.append(
                    ToolCall(
                        item_type,
                        str(item.get("command")),
                        item.get("aggregated_output"),
                        None if exit_code is None else exit_code != 0,
                    )
                )
            elif item_type not in ("reasoning", "todo_list", "user_message"):
                run.tool_calls.append(
                    ToolCall(
                        str(item_type),
                        json.dumps(item),
                        None,
                        item.get("status") == "failed" if "status" in item else None,
                    )
                )
        elif kind == "turn.completed":
            u = event.get("usage") or {}
            turn = Usage(
                int(u.get("input_tokens") or 0),
                int(u.get("cached_input_tokens") or 0),
                int(u.get("output_tokens") or 0),
            )
            total = turn if total is None else total + turn
        elif kind == "turn.failed":
            run.errors.append(f"turn.failed: {(event.get('error') or {}).get('message')}")
        elif kind == "error":
            run.errors.append(str(event.get("message")))
    run.usage = total


def codex_session_calls(codex_home: Path) -> list[Usage]:
    """Per-model-call usage from Codex's session file(s) ($CODEX_HOME/sessions/**/rollout-*.jsonl):
    one `token_usage_record` per model response (its `usage` that response's own)."""
    calls = []
    for path in sorted(codex_home.glob("sessions/**/*.jsonl")):
        for entry in _json_lines(path.read_text(encoding="utf-8", errors="replace")):
            if entry.get("type") == "token_usage_record":
                u = (entry.get("payload") or {}).get("usage") or {}
                calls.append(
                    Usage(
                        int(u.get("input_tokens") or 0),
                        int(u.get("cached_input_tokens") or 0),
                        int(u.get("output_tokens") or 0),
                    )
                )
    return calls


def _claude_usage(u: dict[str, Any]) -> Usage:
    cached = int(u.get("cache_read_input_tokens") or 0)
    written = int(u.get("cache_creation_input_tokens") or 0)
    return Usage(int(u.get("input_tokens") or 0) + cached + written, cached, int(u.get("output_tokens") or 0))


def parse_claude_result(run: AgentRun) -> None:
    """Fill `run` from `claude -p --output-format json`: one JSON object, type "result"
    (subtype, is_error, num_turns, result, usage, api_error_status, permission_denials)."""
    objects = [o for o in _json_lines(run.stdout) if o.get("type") == "result"]
    if not objects:
        try:
            objects = [json.loads(run.stdout)]
        except json.JSONDecodeError:
            run.errors.append("no JSON result on stdout")
            return
    result = run.result = objects[-1]
    run.final_text = result.get("result")
    if isinstance(result.get("usage"), dict):
        run.usage = _claude_usage(result["usage"])
    if result.get("subtype") == "error_max_turns" and result.get("api_error_status") is None:
        # The session reached --max-turns: the model kept calling tools (a 0.5B model's
        # choice after a tool result), not a failed exchange.
        run.notices.append(f"error_max_turns after {result.get('num_turns')} turns")
    elif result.get("is_error") or result.get("subtype") != "success":
        run.errors.append(
            f"{result.get('subtype')} ({result.get('terminal_reason')}, "
            f"api_error_status {result.get('api_error_status')}): {result.get('result')}"
        )
    for denial in result.get("permission_denials") or []:
        run.errors.append(f"permission denied: {json.dumps(denial)}")


def claude_transcript(run: AgentRun, config_dir: Path, session_id: str | None) -> None:
    """Per-call usage and the tool calls from Claude Code's transcript
    ($CLAUDE_CONFIG_DIR/projects/<cwd>/<session id>.jsonl; without a session id, as
    after a timeout, the newest one): an `assistant` entry per model response
    (message.usage, tool_use blocks), `user` entries with tool_result."""
    pattern = f"projects/*/{session_id}.jsonl" if session_id else "projects/*/*.jsonl"
    paths = sorted(config_dir.glob(pattern), key=lambda path: path.stat().st_mtime, reverse=True)
    if not paths:
        return
    calls: dict[str, Usage] = {}
    uses: dict[str, ToolCall] = {}
    for entry in _json_lines(paths[0].read_text(encoding="utf-8", errors="replace")):
        message = entry.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            continue
        if entry.get("type") == "assistant":
            key = str(message.get("id") or entry.get("requestId") or len(calls))
            if isinstance(message.get("usage"), dict):
                calls[key] = _claude_usage(message["usage"])  # a response split over entries repeats it
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    uses[str(block.get("id"))] = ToolCall(str(block.get("name")), json.dumps(block.get("input")))
        elif entry.get("type") == "user":
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    call = uses.get(str(block.get("tool_use_id")))
                    if call is not None:
                        content = block.get("content")
                        call.output = content if isinstance(content, str) else json.dumps(content)
                        call.failed = bool(block.get("is_error"))
    run.calls = list(calls.values())
    run.tool_calls = list(uses.values())
