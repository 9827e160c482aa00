"""kvchat's OpenAI-compatible HTTP server.

- :func:`create_app`: a FastAPI app over an engine the caller owns;
- :func:`serve`: load a model, build the engine and run uvicorn until stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvchat.server.app import create_app

if TYPE_CHECKING:
    from kvchat.engine import EngineSettings

__all__ = ["create_app", "serve"]


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_keys: Sequence[str] = (),
    settings: EngineSettings | None = None,
    log_level: str = "info",
) -> None:
    """Serve `model` (a packaged model name or a GGUF path) until interrupted.

    The model id clients must send is `model_name` (default: `model`).
    """
    import uvicorn

    from kvchat.engine import Engine, EngineSettings

    with Engine(model, settings or EngineSettings()) as engine:
        app = create_app(engine, model_name=model_name or model, api_keys=api_keys)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
