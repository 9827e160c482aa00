"""`ServerState`: what every route of one app shares (engine, settings, metrics, gate).

The routes reach it through the :func:`server_state` dependency; the app is
built around it in :func:`kvchat.server.app.create_app`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from typing import Any

from fastapi import Request

from kvchat.engine import Engine, SamplingParams
from kvchat.engine.embedder import Embedder
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import APIError
from kvchat.server.metrics import ServerMetrics
from kvchat.server.runs import Admission, RequestRun
from kvchat.server.settings import ServerSettings


class ServerState:
    """The engine an app serves and the server-side machinery around it."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine)
        self.admission = Admission(
            engine.settings.max_running + settings.max_queued, settings.retry_after, self.metrics
        )
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    # -- per request -----------------------------------------------------------

    def authorize(self, request: Request) -> str | None:
        """The request's cache namespace; 401 on a missing or wrong API key.

        Without API keys (or with `isolate_api_keys` off) every request shares one namespace (None).
        """
        keys = self.settings.api_keys
        if not keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        # Compare with every key (no early exit), in constant time per key.
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        if not self.settings.isolate_api_keys:
            return None
        return "key-" + hashlib.sha256(token.encode()).hexdigest()[:32]

    def check_model(self, requested: str) -> None:
        """404 unless `requested` is the served model's id."""
        if requested != self.settings.model_name:
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {self.settings.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def new_run(self) -> RequestRun:
        """Admit a model request (429 if the server is full)."""
        return RequestRun(
            self.admission,
            self.metrics,
            timeout=self.settings.request_timeout,
            shutdown_grace=self.settings.shutdown_grace,
        )

    def sampling(self, body: Any, max_tokens: int | None) -> SamplingParams:
        """Sampling options of a chat or text completion body; unset ones keep kvchat's defaults.

        `max_tokens` over the server's `max_tokens_limit` is a 400; None means
        "until the model stops", bounded by the engine's `open_max_tokens`.
        """
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and limit is not None and max_tokens > limit:
            raise InvalidRequestError(
                f"max_tokens is {max_tokens}; this server allows at most {limit}", field="max_tokens"
            )
        options: dict[str, Any] = {"max_tokens": max_tokens}
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(body, name)
            if value is not None:
                options[name] = value
        if body.stop is not None:
            options["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if body.logit_bias:
            try:
                options["logit_bias"] = {int(token): bias for token, bias in body.logit_bias.items()}
            except ValueError:
                raise InvalidRequestError("logit_bias keys must be token ids", field="logit_bias") from None
        return SamplingParams(**options)

    # -- embeddings --------------------------------------------------------------

    def embedder(self) -> Embedder:
        """The embedding context on the served model's weights, made at first use."""
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder(self.engine.model, n_threads=self.engine.settings.n_threads)
            return self._embedder

    async def embed(self, texts: list[str]) -> tuple[Any, int]:
        """Embed `texts` off the event loop: a float32 array (one row per text) and
        the number of tokens evaluated."""

        def work() -> tuple[Any, int]:
            embedder = self.embedder()
            token_lists = [embedder.tokenize(text) for text in texts]
            return embedder.embed_tokens(token_lists), sum(len(tokens) for tokens in token_lists)

        return await asyncio.to_thread(work)

    def close(self) -> None:
        """Free what the server made (the embedder); the engine belongs to the caller."""
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's :class:`ServerState`."""
    return request.app.state.kvchat


def authorized(request: Request) -> str | None:
    """FastAPI dependency: check the API key (401) before the body is validated;
    gives the request's cache namespace."""
    return server_state(request).authorize(request)
