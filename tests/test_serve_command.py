"""`kvchat serve` as users run it: a child process, settings from the environment,
JSON access logs, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from http_server import ServeProcess

pytestmark = pytest.mark.system  # child processes (see tests/conftest.py)

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def stream_lines(url: str, body: dict, into: list[str], first: threading.Event) -> None:
    """Read a streamed completion's data lines into `into`; set `first` at the first one."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    into.append(line[len("data: "):])
                    first.set()
    except httpx.TransportError as exc:
        into.append(f"transport error: {exc}")
    finally:
        first.set()


def start_stream(url: str, max_tokens: int) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    first = threading.Event()
    body = {"model": "gm", "prompt": "1, 2, 3, 4, 5,", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    thread = threading.Thread(target=stream_lines, args=(url, body, lines, first))
    thread.start()
    assert first.wait(60), "no first chunk"
    return thread, lines


def serve_gemma(tmp_path, grace: float) -> ServeProcess:
    env = {"KVCHAT_MODEL": "gemma-3-270m", "KVCHAT_MODEL_NAME": "gm", "KVCHAT_API_KEY": KEY,
           "KVCHAT_CTX_SIZE": "2048", "KVCHAT_PARALLEL": "2", "KVCHAT_SHUTDOWN_GRACE": str(grace)}
    return ServeProcess(env=env, log_path=str(tmp_path / "serve.log"))


def assert_clean_exit(server: ServeProcess, returncode: int) -> None:
    """Stopped by SIGTERM after a complete shutdown (uvicorn re-raises the signal at the end)."""
    assert returncode == -signal.SIGTERM
    log = server.log()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_settings_from_environment_and_access_log(tmp_path) -> None:
    with serve_gemma(tmp_path, grace=5) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        models = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
        assert [m["id"] for m in models["data"]] == ["gm"]
        reply = server.client(KEY).completions.create(model="gm", prompt="1, 2, 3,", max_tokens=3, temperature=0)
        assert reply.model == "gm" and reply.usage.completion_tokens == 3  # served under KVCHAT_MODEL_NAME
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert {"time", "method", "path", "status", "duration_ms", "client"} <= set(records[0])
    assert [(r["path"], r["status"]) for r in records if r["path"].startswith("/v1")] == [
        ("/v1/models", 401), ("/v1/models", 200), ("/v1/completions", 200)]
    assert_clean_exit(server, server.process.returncode)


def test_hosts_shares_and_embedding_bound_from_options_and_environment(tmp_path) -> None:
    env = {"KVCHAT_MODEL": "gemma-3-270m", "KVCHAT_MODEL_NAME": "gm", "KVCHAT_API_KEY": f"{KEY} other-key",
           "KVCHAT_CTX_SIZE": "1024", "KVCHAT_PARALLEL": "2", "KVCHAT_KEY_SHARE": "0.5",
           "KVCHAT_ALLOWED_HOST": "models.lan *.corp.example"}
    with ServeProcess("--max-embedding-tokens", "8", env=env, log_path=str(tmp_path / "serve.log")) as server:
        for host, status in [("evil.example", 403), ("models.lan:8000", 200), ("gpu.corp.example", 200),
                             ("localhost:80", 200)]:
            response = httpx.get(f"{server.url}/health", headers={"Host": host})
            assert response.status_code == status, host
        assert response.json()["status"] == "ok"
        response = httpx.post(f"{server.url}/v1/embeddings", headers=AUTH, timeout=60,
                              json={"model": "gm", "input": ["one two three four five six seven eight nine ten"]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    assert_clean_exit(server, server.process.returncode)


def test_sigterm_lets_in_flight_streams_finish(tmp_path) -> None:
    server = serve_gemma(tmp_path, grace=60).start()
    try:
        thread, lines = start_stream(server.url, max_tokens=48)
        server.signal()
        thread.join(120)
        assert lines[-1] == "[DONE]"
        finish = [json.loads(line)["choices"][0]["finish_reason"] for line in lines[:-1]]
        assert finish[-1] == "length"  # all 48 tokens, though the server was told to stop
        assert_clean_exit(server, server.wait(60))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop()


def test_sigterm_cancels_streams_that_outlast_the_grace_period(tmp_path) -> None:
    server = serve_gemma(tmp_path, grace=0.5).start()
    try:
        thread, lines = start_stream(server.url, max_tokens=1500)
        started = time.monotonic()
        server.signal()
        thread.join(120)
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "server_shutdown"
        assert_clean_exit(server, server.wait(60))
        assert time.monotonic() - started < 30  # far sooner than 1500 tokens
    finally:
        server.stop()
