"""The OpenAI-compatible HTTP app: ``create_app(engine, model_name=...)``.

The app holds no model state: it keeps a reference to an engine its caller made
(and closes), and every request goes through :func:`kvchat.chat.complete.complete`.

Endpoints: ``POST /v1/chat/completions`` (streaming by server-sent events, or
not), ``GET /v1/models``, ``GET /health``.

Decisions where OpenAI's API and kvchat differ, or OpenAI is silent:

- ``max_tokens``/``max_completion_tokens`` unset: generate until the model stops
  or the sequence's context is full (as OpenAI).
- ``temperature``/``top_p`` unset: kvchat's defaults (:class:`SamplingParams`).
- ``n`` other than 1 is refused (400, param ``n``): one choice per request.
- ``user`` is accepted and ignored; cache isolation follows the API key instead:
  with `api_keys`, each key's requests share prefixes only with that key's
  (``cache_key`` is a hash of the key).
- A request that was cancelled (server shutting down) finishes with ``"stop"``.
- Errors are OpenAI-shaped (see :mod:`kvchat.server.errors`); an error after a
  stream has started is sent as one ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from sse_starlette.sse import EventSourceResponse

from kvchat.chat.complete import ChatDelta, ChatStream, complete
from kvchat.engine import Engine, SamplingParams, Usage
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import APIError, error_body, error_for, install_error_handlers
from kvchat.server.schemas import ChatCompletionRequest

__all__ = ["create_app"]

log = logging.getLogger("kvchat.server")


def create_app(engine: Engine, *, model_name: str, api_keys: Sequence[str] = ()) -> FastAPI:
    """An app that serves `engine` under the model id `model_name`.

    With `api_keys`, every ``/v1`` request needs ``Authorization: Bearer <key>``
    with one of them (401 otherwise). The caller owns `engine` and closes it.
    """
    app = FastAPI(title="kvchat", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    keys = tuple(api_keys)
    created = int(time.time())

    def authorize(request: Request) -> str | None:
        """The request's cache key (None without api keys); 401 on a missing or wrong key."""
        if not keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in keys):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return "key-" + hashlib.sha256(token.encode()).hexdigest()[:32]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        if engine.closed:
            raise APIError(503, "the model is not available", type="server_error", code="engine_closed")
        stats = engine.stats()
        return {"status": "ok", "model": model_name, "active": stats.active, "queued": stats.queued}

    @app.get("/v1/models")
    async def models(_: str | None = Depends(authorize)) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, _: str | None = Depends(authorize)) -> dict[str, Any]:
        _check_model(model_id, model_name)
        return _model_card(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, cache_key: str | None = Depends(authorize)):
        _check_model(body.model, model_name)
        if body.n is not None and body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        try:
            stream = await asyncio.to_thread(
                complete,
                engine,
                body.history(),
                tools=body.tools,
                tool_choice=body.tool_choice,
                response_format=body.response_format,
                sampling=_sampling(body),
                cache_key=cache_key,
            )
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI-shaped one
            raise error_for(exc) from None
        reply_id = "chatcmpl-" + uuid.uuid4().hex
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(_events(stream, reply_id, model_name, include_usage), ping=15)
        try:
            reply = await stream.acollect()
        except BaseException as exc:
            stream.cancel()
            if isinstance(exc, Exception):
                raise error_for(exc) from None
            raise
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in reply.tool_calls]
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(reply.finish_reason)}],
            "usage": _usage(reply.usage),
        }

    return app


def _model_card(model_name: str, created: int) -> dict[str, Any]:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "kvchat"}


def _check_model(requested: str, model_name: str) -> None:
    if requested != model_name:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def _sampling(body: ChatCompletionRequest) -> SamplingParams:
    """The request's sampling options; unset ones keep kvchat's defaults."""
    options: dict[str, Any] = {"max_tokens": body.max_completion_tokens or body.max_tokens}
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


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def _events(stream: ChatStream, reply_id: str, model_name: str, include_usage: bool) -> AsyncIterator[dict]:
    """The SSE events of a streamed reply, ending with ``[DONE]``.

    If the client disconnects, sse-starlette cancels this generator; the
    ``finally`` cancels the request, so the engine stops within one step.
    """
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> dict[str, str]:
        body: dict[str, Any] = {
            "id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
            "system_fingerprint": None,
            "choices": [] if usage is not None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return {"data": json.dumps(body, ensure_ascii=False)}

    calls = 0
    last: ChatDelta | None = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for delta in stream:
            if delta.content:
                yield chunk({"content": delta.content})
            for call in delta.tool_calls:
                yield chunk({"tool_calls": [{"index": calls, **call.to_openai()}]})
                calls += 1
            last = delta
        if last is not None and last.finish_reason is not None:
            yield chunk({}, _finish(last.finish_reason))
            if include_usage and last.usage is not None:
                yield chunk({}, usage=_usage(last.usage))
    except Exception as exc:  # noqa: BLE001 - the status line is already sent
        error = error_for(exc)
        yield {"data": json.dumps(error_body(error.message, type=error.type, param=error.param, code=error.code))}
    finally:
        stream.cancel()
    yield {"data": "[DONE]"}
