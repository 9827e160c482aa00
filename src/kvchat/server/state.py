"""`ServerState`: what every route of one app shares (engine, chat runtime,
settings, metrics, admission, the embedding worker, the stored responses).

The routes reach it through the :func:`server_state` dependency; the app is
built around it in :func:`kvchat.server.app.create_app`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from kvchat.chat import ChatRuntime
from kvchat.chat.runtime import runtime_for
from kvchat.engine import Engine, SamplingParams
from kvchat.engine.embedder import Embedder
from kvchat.errors import InvalidRequestError
from kvchat.server.admission import Admission
from kvchat.server.embedding_worker import EmbeddingWorker
from kvchat.server.errors import APIError
from kvchat.server.metrics import ServerMetrics
from kvchat.server.response_objects import ResponseFrame
from kvchat.server.response_store import ResponseStore
from kvchat.server.responses_api import ResponsesRequest, response_frame
from kvchat.server.runs import RequestRun
from kvchat.server.settings import ServerSettings


@dataclass(frozen=True)
class Tenant:
    """Who sent a request: `key` names its API key (a digest; ``""`` on a server
    without keys), `cache_key` is its cache namespace (None: the shared one)."""

    key: str
    cache_key: str | None


class ServerState:
    """The engine an app serves and the server-side machinery around it.

    Chat requests run on `chat_runtime` (a :class:`ChatRuntime` on `engine`; by
    default the engine's shared one), whose tokenizer and generated-token memory
    every chat request of the app shares.
    """

    def __init__(self, engine: Engine, settings: ServerSettings, chat_runtime: ChatRuntime | None = None) -> None:
        self.engine = engine
        self.chat_runtime = runtime_for(engine, chat_runtime)
        self.settings = settings
        self.created = int(time.time())
        self.shutting_down: Callable[[], bool] = lambda: False
        """Whether the server has begun to shut down (`kvchat.server.serve` points it at
        uvicorn's flag): in-flight requests then get `shutdown_grace` seconds."""
        self.metrics = ServerMetrics(engine)
        self.admission = Admission(
            max_running=engine.settings.max_running,
            max_queued=settings.max_queued,
            key_share=settings.key_share,
            shared=len(set(settings.api_keys)) >= 2,
            retry_after=settings.retry_after,
            metrics=self.metrics,
        )
        self.responses = ResponseStore(
            max_entries=settings.responses_store_max,
            max_bytes=settings.responses_store_bytes,
            ttl=settings.responses_store_ttl,
            key_share=settings.key_share if len(set(settings.api_keys)) >= 2 else 1.0,
        )
        """The stored ``/v1/responses`` responses, namespaced by API key."""
        self.response_frame: Callable[[ResponsesRequest, ServerSettings, SamplingParams], ResponseFrame] = (
            response_frame
        )
        """What a ``/v1/responses`` response echoes of its request
        (:func:`kvchat.server.responses_api.response_frame`); replaceable, so that a
        test can make a response that the checks on the way in would refuse."""
        self.embeddings = EmbeddingWorker(lambda: Embedder(self.engine.model, n_threads=self.engine.settings.n_threads))

    # -- per request -----------------------------------------------------------

    def authorize(self, request: Request) -> Tenant:
        """Who sent the request; 401 on a missing or wrong API key.

        The key comes as ``Authorization: Bearer KEY`` (OpenAI's clients) or as
        ``x-api-key: KEY`` (Anthropic's); a key is the same tenant either way. When
        a request carries both, the first valid one counts (``x-api-key`` first).
        Without API keys (or with `isolate_api_keys` off) every request shares one
        cache namespace (None).
        """
        keys = self.settings.api_keys
        if not keys:
            return Tenant("", None)
        # Compare every credential with every key (no early exit), in constant time per key.
        valid = [token for token in _credentials(request) if any(_matches(token, keys))]
        if not valid:
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        digest = "key-" + hashlib.sha256(valid[0].encode()).hexdigest()[:32]
        return Tenant(digest, digest if self.settings.isolate_api_keys else None)

    def check_model(self, requested: str) -> None:
        """404 unless the served model answers to `requested` (its name, an alias,
        or any id with `any_model`; see :meth:`ServerSettings.serves`)."""
        if not self.settings.serves(requested):
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {self.settings.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def new_run(self, request: Request, tenant: Tenant, *, items: int = 1) -> RequestRun:
        """Admit a model request of `tenant` that runs `items` items (prompts, texts;
        see :class:`Admission`), or 429 if the server or the tenant's share is full;
        the run watches `request`'s client for a disconnect."""
        return RequestRun(
            self.admission,
            tenant.key,
            self.metrics,
            timeout=self.settings.request_timeout,
            shutdown_grace=self.settings.shutdown_grace,
            request=request,
            items=items,
            shutting_down=self.shutting_down,
        )

    def sampling(self, body: Any, max_tokens: int | None) -> SamplingParams:
        """Sampling options of a chat or text completion body; unset ones keep the server's defaults.

        `max_tokens` over the server's `max_tokens_limit` is a 400; None means
        "until the model stops", bounded by the engine's `open_max_tokens`.
        """
        self.check_max_tokens(max_tokens)
        options: dict[str, Any] = {"max_tokens": max_tokens, **self.sampling_defaults()}
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

    def sampling_defaults(self) -> dict[str, Any]:
        """The server's own defaults for sampling options a request leaves unset
        (`ServerSettings.temperature`), as `SamplingParams` keyword arguments."""
        temperature = self.settings.temperature
        return {} if temperature is None else {"temperature": temperature}

    def check_max_tokens(self, max_tokens: int | None, field: str = "max_tokens") -> None:
        """400 (param `field`) if `max_tokens` is over the server's `max_tokens_limit`."""
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and limit is not None and max_tokens > limit:
            raise InvalidRequestError(f"{field} is {max_tokens}; this server allows at most {limit}", field=field)

    def check_tool_count(self, count: int, *, counted: str = "tools") -> None:
        """400 (param ``tools``) if `count` tools are over the server's `max_tools`
        (`counted` names what was counted, in the message)."""
        limit = self.settings.max_tools
        if count > limit:
            raise APIError(400, f"{count} {counted}; this server allows at most {limit}", param="tools")

    def close(self) -> None:
        """Stop the embedding worker and free its embedder; the engine belongs to the caller."""
        self.embeddings.close()


def _matches(token: str, keys: tuple[str, ...]) -> list[bool]:
    """`token` compared with each key, in constant time per key."""
    return [hmac.compare_digest(token.encode(), key.encode()) for key in keys]


def _credentials(request: Request) -> list[str]:
    """The API keys a request presents: its ``x-api-key`` header, then its bearer token."""
    found = []
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key:
        found.append(api_key)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    return found


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's :class:`ServerState`."""
    return request.app.state.kvchat


def authorized(request: Request) -> Tenant:
    """FastAPI dependency: check the API key (401) before the body is validated;
    gives the request's :class:`Tenant`."""
    return server_state(request).authorize(request)
