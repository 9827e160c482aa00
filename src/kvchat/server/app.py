"""The OpenAI-compatible (and Anthropic-compatible) HTTP app: ``create_app(engine, model_name=...)``.

The app holds no model state: it keeps a reference to an engine its caller made
(and closes); chat requests go through a chat runtime on that engine
(:meth:`kvchat.chat.ChatRuntime.complete`: the caller's, or the engine's shared
one), text completions straight to :meth:`Engine.submit`.

Endpoints (see the modules under :mod:`kvchat.server.routes`):
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``
(all three streamed by server-sent events, or not), ``GET`` and ``DELETE
/v1/responses/{id}``, Anthropic's ``POST /v1/messages`` (streamed or not) and
``POST /v1/messages/count_tokens``, ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``.

Decisions where OpenAI's API and kvchat differ, or OpenAI is silent:

- ``max_tokens`` unset on a chat: generate until the model stops, bounded by
  the engine's `open_max_tokens` and the context; a value over the server's
  `max_tokens_limit` is a 400.
- ``temperature`` unset: the server's `temperature` if it has one, else kvchat's
  default (:class:`SamplingParams`); ``top_p`` unset: kvchat's default.
- ``n`` other than 1 is refused (400, param ``n``): one choice per request.
- A request may name the served model by its `model_name`, by one of its
  `model_aliases`, or (with `any_model`) by any id; ``/v1/models`` lists the name
  and the aliases.
- An API key comes as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``
  (Anthropic's clients); errors on ``/v1/messages`` paths are Anthropic-shaped.
- ``user`` is accepted and ignored; cache isolation follows the API key instead:
  with API keys, each key's requests share prefixes only with that key's.
- A request the server cuts short (time limit, shutdown) ends with an error
  (``request_timeout`` 504, ``server_shutdown`` 503); mid-stream it is sent as
  one ``data: {"error": ...}`` event before ``[DONE]``.
- ``/health`` and ``/metrics`` need no API key; everything under ``/v1`` does.
- Every path answers only requests whose ``Host`` header names a loopback host
  or one of `allowed_hosts` (403 otherwise): DNS rebinding cannot reach it.
- One API key among several holds at most its `key_share` of the running places
  and of the queue (429 beyond it), counting one place per prompt of a
  completion and per input of an embedding; see :mod:`kvchat.server.admission`.
- Templates are rendered, conversations fitted and prompts tokenized on the
  app's bounded work pool (503 ``server_busy`` when its queue is full); see
  :mod:`kvchat.server.work_pool`.
- Stored responses (``/v1/responses``) are kept in memory, bounded in count,
  size and age, and reachable only with the API key that made them (404
  otherwise, as for an unknown id); see :mod:`kvchat.server.routes.responses`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from kvchat.chat import ChatRuntime
from kvchat.engine import Engine
from kvchat.server.errors import install_error_handlers
from kvchat.server.middleware import AccessLog, BodySizeLimit, HostCheck
from kvchat.server.routes import chat, completions, embeddings, info, messages, responses
from kvchat.server.settings import ServerSettings
from kvchat.server.state import ServerState
from kvchat.server.work_pool import WorkPool

__all__ = ["create_app"]


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    *,
    owns_engine: bool = False,
    chat_runtime: ChatRuntime | None = None,
    **options: Any,
) -> FastAPI:
    """An app that serves `engine`, configured by `settings` or by
    :class:`ServerSettings` keyword options (``model_name=...`` at least).

    Chats run on `chat_runtime` (a :class:`ChatRuntime` on `engine`, shared with
    whatever else chats on it), by default the engine's shared runtime.
    The caller closes `engine` after the app stops, unless `owns_engine`: then the
    app's shutdown closes it (which also saves the prefix cache to its disk tier).
    """
    settings = settings or ServerSettings(**options)
    state = ServerState(engine, settings, chat_runtime)
    # Made with the app, not in the lifespan: a host that never runs the lifespan
    # still serves (the pool's threads start with work and end when idle).
    work = WorkPool(threads=settings.work_threads, max_queued=settings.work_queue, retry_after=settings.retry_after)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Before the engine closes: no job submits to a closed engine.
        await asyncio.to_thread(work.close)
        state.close()
        if owns_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="kvchat", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.kvchat = state
    app.state.kvchat_work = work
    install_error_handlers(app)
    for module in (chat, completions, responses, messages, embeddings, info):
        app.include_router(module.router)
    # Added innermost first: the size check runs last, CORS headers reach 413s
    # too, a foreign Host is refused before anything else, and the access log
    # sees every request.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    app.add_middleware(
        AccessLog, count=lambda endpoint, status: state.metrics.requests.labels(endpoint, str(status)).inc()
    )
    return app
