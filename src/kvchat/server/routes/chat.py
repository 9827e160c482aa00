"""``POST /v1/chat/completions``: a chat through the app's chat runtime
(:meth:`kvchat.chat.ChatRuntime.complete`).

The request is admitted before any work (rendering and tokenizing the prompt and
the ``prediction`` happen on the server's work pool, once the request holds its
running place); a client that disconnects cancels the request, streamed or not,
and stops that work between its phases (or before it starts). A ``prediction``
(OpenAI's predicted outputs) gives speculative decoding its drafts; the usage
reports the drafts of every request (see :func:`openai_usage`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Depends, Request

from kvchat.chat import ChatStream
from kvchat.server.errors import APIError
from kvchat.server.routes.common import finish_reason, openai_usage
from kvchat.server.runs import RequestRun, serving
from kvchat.server.schemas import ChatCompletionRequest
from kvchat.server.sse import Event, data_event, sse_response
from kvchat.server.state import ServerState, Tenant, authorized, server_state
from kvchat.server.work_pool import work_pool

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    state.check_model(body.model)
    if body.n is not None and body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    state.check_tool_count(len(body.tools or ()))
    sampling = state.sampling(body, body.max_completion_tokens or body.max_tokens)
    prediction = body.prediction_text()
    run = state.new_run(request, tenant)
    with serving(run):
        await run.start()
        stream = await work_pool(request).run_for(
            run,
            lambda cancelled: state.chat_runtime.complete(
                body.history(),
                tools=body.tools,
                tool_choice=body.tool_choice,
                response_format=body.response_format,
                sampling=sampling,
                cache_key=tenant.cache_key,
                prediction=prediction,
                cancelled=cancelled,
            ),
            discard=ChatStream.cancel,
        )
        run.attach(stream)
        reply_id = "chatcmpl-" + uuid.uuid4().hex
        model = state.settings.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _chat_events(stream, run, reply_id, model, include_usage)
            return sse_response(run, stream, events, shutdown_grace=state.settings.shutdown_grace)
        reply = await stream.acollect()
        run.usage = reply.usage
        if run.error is not None:
            raise run.error
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in reply.tool_calls]
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reply.finish_reason)}
        ],
        "usage": openai_usage(reply.usage),
    }


async def _chat_events(
    stream: ChatStream, run: RequestRun, reply_id: str, model: str, include_usage: bool
) -> AsyncGenerator[Event, None]:
    """The chunks of a streamed reply (``[DONE]`` and errors are added by `sse_response`)."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> Event:
        body: dict[str, Any] = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": []
            if usage is not None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return data_event(body)

    calls = 0
    yield chunk({"role": "assistant", "content": ""})
    async for delta in stream:
        if delta.content:
            yield chunk({"content": delta.content})
        for call in delta.tool_calls:
            yield chunk({"tool_calls": [{"index": calls, **call.to_openai()}]})
            calls += 1
        if delta.usage is not None:
            run.usage = delta.usage
        if delta.finish_reason is not None and run.error is None:
            yield chunk({}, finish_reason(delta.finish_reason))
            if include_usage and delta.usage is not None:
                yield chunk({}, usage=openai_usage(delta.usage))
