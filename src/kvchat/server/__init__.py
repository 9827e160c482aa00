"""kvchat's OpenAI-compatible HTTP server.

- :func:`create_app`: a FastAPI app over an engine the caller owns;
- :func:`serve`: load a model, build the engine and run uvicorn until stopped
  (what ``kvchat serve`` runs).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvchat.server.settings import ServerSettings

if TYPE_CHECKING:
    from kvchat.engine import EngineSettings
    from kvchat.server.app import create_app

__all__ = ["ServerSettings", "create_app", "default_model_name", "serve"]


def __getattr__(name: str) -> Any:
    # FastAPI and uvicorn load on first use: `kvchat` commands that only read the
    # settings (every command's start-up) do not pay for them.
    if name == "create_app":
        from kvchat.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_model_name(model: str | os.PathLike[str]) -> str:
    """The id clients send for `model`: a packaged model's name, or a GGUF file's stem."""
    text = str(model)
    return Path(text).stem if text.endswith(".gguf") or os.sep in text else text


def serve(
    model: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    engine_settings: EngineSettings | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve `model` (a packaged model name or a GGUF path) until SIGINT or SIGTERM.

    On a shutdown signal the server stops accepting connections, lets in-flight
    requests run for `settings.shutdown_grace` seconds, cancels those still
    running (streams get a ``server_shutdown`` error event), closes the engine
    (saving the prefix cache to its disk tier, if any) and ends the process by
    the signal it received (uvicorn's convention).
    Access logs are JSON lines on stderr (logger ``kvchat.server.access``).

    Requests must name a loopback host or one of `settings.allowed_hosts` in
    their ``Host`` header; a specific address given as `host` is allowed too
    (clients that reach the server by it are expected). Bound to every address
    (``0.0.0.0``, ``::``), the server answers remote clients only for the names
    the operator allows.
    """
    import dataclasses

    import uvicorn

    from kvchat.engine import Engine
    from kvchat.models import resolve
    from kvchat.server.app import create_app
    from kvchat.server.middleware import host_name, is_loopback

    settings = settings or ServerSettings(model_name=default_model_name(model))
    _configure_logging(log_level, access_log)
    everywhere = host in ("", "0.0.0.0", "::")
    if not everywhere and not is_loopback(host_name(_bracketed(host)) or ""):
        settings = dataclasses.replace(settings, allowed_hosts=(*settings.allowed_hosts, _bracketed(host)))
    elif everywhere and not settings.allowed_hosts:
        logging.getLogger("kvchat.server").warning(
            "listening on every address, but answering only requests for localhost; "
            "allow the names clients use with --allowed-host NAME (or '*')"
        )
    with Engine(resolve(model), engine_settings) as engine:
        # The app closes the engine at shutdown: uvicorn ends the process by
        # re-raising the signal as soon as it returns, so `with` cannot be relied on.
        app = create_app(engine, settings, owns_engine=True)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        )
        server = uvicorn.Server(config)
        app.state.kvchat.shutting_down = lambda: server.should_exit
        server.run()


def _bracketed(host: str) -> str:
    """`host` as a Host header names it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _configure_logging(log_level: str, access_log: bool) -> None:
    level = getattr(logging, log_level.upper(), logging.INFO)
    kvchat_log = logging.getLogger("kvchat")
    # The library's own NullHandler does not count: logs must reach stderr.
    if not any(not isinstance(h, logging.NullHandler) for h in kvchat_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        kvchat_log.addHandler(handler)
    kvchat_log.setLevel(level)
    # llama.cpp narrates every load at info level; keep it for debugging.
    logging.getLogger("kvchat.llama.cpp").setLevel(level if level <= logging.DEBUG else logging.WARNING)
    access = logging.getLogger("kvchat.server.access")
    access.propagate = False
    access.handlers.clear()
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))  # each record is one JSON object
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.addHandler(logging.NullHandler())
