"""``POST /v1/completions``: raw text completion (no chat template).

Decisions: a text prompt is tokenized with the model's BOS and with
special-token text parsed (the caller writes the whole prompt, as with
llama.cpp's server); token-id prompts are used as given. Several prompts give
one choice each, generated together in the engine's batch; streaming takes one
prompt. ``max_tokens`` defaults to 16 (as OpenAI). ``echo`` is supported;
``suffix``, ``logprobs`` and ``best_of`` other than 1 are refused (400).

The request is admitted before its prompts are tokenized, and they are
tokenized on the server's work pool: a prompt of megabytes neither does work for
a request that gets 429 nor stalls the event loop. A client that disconnects
cancels the request, streamed or not (tokenizing stops before the next prompt).

Each prompt counts one place of the API key's share (see
:class:`kvchat.server.admission.Admission`), and the request has at most as many
prompts with the engine at once as it holds places: with more prompts than its
key's running places, it runs them in waves (a prompt starts when an earlier one
ends), so it never crowds another key's requests out of the engine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Depends, Request

from kvchat.engine import Completion, Engine, SamplingParams, Stream, Usage
from kvchat.server.errors import APIError
from kvchat.server.routes.common import finish_reason, openai_usage
from kvchat.server.runs import RequestRun, serving
from kvchat.server.schemas import CompletionRequest
from kvchat.server.sse import Event, data_event, sse_response
from kvchat.server.state import ServerState, Tenant, authorized, server_state
from kvchat.server.work_pool import CancelCheck, work_pool

router = APIRouter()


class _StreamGroup:
    """The streams of one request's prompts, cancelled together (no prompt starts after that)."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        for stream in self.streams:
            stream.cancel()

    async def run_all(
        self, engine: Engine, token_lists: list[list[int]], sampling: SamplingParams, cache_key: str | None, width: int
    ) -> list[Completion | None]:
        """Run every prompt, at most `width` at once, each starting when an earlier
        one ends; a prompt that never started (the group was cancelled) has None."""
        results: list[Completion | None] = [None] * len(token_lists)
        waiting = iter(range(len(token_lists)))

        async def lane() -> None:
            for index in waiting:
                if self.cancelled:
                    return
                stream = engine.submit(token_lists[index], sampling, cache_key=cache_key)
                self.streams.append(stream)
                results[index] = await stream.acollect()

        await asyncio.gather(*(lane() for _ in range(min(width, len(token_lists)))))
        return results


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    state.check_model(body.model)
    prompts = body.prompts()
    _check_supported(body, len(prompts), max_prompts=state.engine.settings.max_running)
    sampling = state.sampling(body, body.max_tokens)
    engine = state.engine
    run = state.new_run(request, tenant, items=len(prompts))
    with serving(run):
        await run.start()
        # A text prompt may be megabytes: tokenize it off the event loop, once admitted.
        token_lists, echoed = await work_pool(request).run_for(
            run, lambda cancelled: _prepare(engine, prompts, echo=bool(body.echo), cancelled=cancelled)
        )
        group = _StreamGroup([])
        run.attach(group)
        reply_id = "cmpl-" + uuid.uuid4().hex
        model = state.settings.model_name
        if body.stream:
            group.streams.append(engine.submit(token_lists[0], sampling, cache_key=tenant.cache_key))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _text_events(group.streams[0], run, reply_id, model, echoed[0], include_usage)
            return sse_response(run, group, events, shutdown_grace=state.settings.shutdown_grace)
        width = state.admission.places(len(prompts))
        finished = await group.run_all(engine, token_lists, sampling, tenant.cache_key, width)
        if run.error is not None:
            raise run.error
        results = [result for result in finished if result is not None]
        if len(results) < len(finished):  # (only a stopped run cancels the group)
            raise APIError(503, "the request was stopped", type="server_error")
        total = _sum_usage([result.usage for result in results])
        run.usage = total
    return {
        "id": reply_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": index,
                "text": echoed[index] + result.text,
                "logprobs": None,
                "finish_reason": finish_reason(result.usage.finish_reason),
            }
            for index, result in enumerate(results)
        ],
        "usage": openai_usage(total),
    }


def _check_supported(body: CompletionRequest, count: int, *, max_prompts: int) -> None:
    if body.n is not None and body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if body.best_of is not None and body.best_of != 1:
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix")
    if body.logprobs is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if count == 0:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if count > max_prompts:
        raise APIError(400, f"{count} prompts; at most {max_prompts} per request", param="prompt")
    if body.stream and count > 1:
        raise APIError(400, "a streamed completion takes one prompt", param="prompt")


def _prepare(
    engine: Engine, prompts: list[str | list[int]], *, echo: bool, cancelled: CancelCheck
) -> tuple[list[list[int]], list[str]]:
    """The prompts' tokens and (with `echo`) their text; stops before the next
    prompt once `cancelled` (the request's result is its error then)."""
    token_lists: list[list[int]] = []
    echoed: list[str] = []
    for prompt in prompts:
        if cancelled():
            break
        token_lists.append(_tokens(engine, prompt))
        echoed.append(_echo_text(engine, prompt) if echo else "")
    return token_lists, echoed


def _tokens(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.model.tokenize(prompt, add_special=True, parse_special=True)
    return prompt


def _echo_text(engine: Engine, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    ids = engine.checked_prompt(prompt)  # what submit checks, before the ids are turned into text
    return b"".join(engine.model.token_to_bytes(token) for token in ids).decode("utf-8", "replace")


def _sum_usage(usages: list[Usage]) -> Usage:
    first_tokens = [u.time_to_first_token for u in usages if u.time_to_first_token is not None]
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
        evaluated_tokens=sum(u.evaluated_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        time_to_first_token=min(first_tokens) if first_tokens else None,
        finish_reason=usages[0].finish_reason,
        draft_tokens=sum(u.draft_tokens for u in usages),
        accepted_draft_tokens=sum(u.accepted_draft_tokens for u in usages),
    )


async def _text_events(
    stream: Stream, run: RequestRun, reply_id: str, model: str, echoed: str, include_usage: bool
) -> AsyncGenerator[Event, None]:
    created = int(time.time())

    def chunk(text: str, finish: str | None = None, usage: Usage | None = None) -> Event:
        body: dict[str, Any] = {
            "id": reply_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": []
            if usage is not None
            else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = openai_usage(usage)
        return data_event(body)

    if echoed:
        yield chunk(echoed)
    async for piece in stream:
        if piece.text:
            yield chunk(piece.text)
        if piece.usage is not None:
            run.usage = piece.usage
            if run.error is None:
                yield chunk("", finish_reason(piece.usage.finish_reason))
                if include_usage:
                    yield chunk("", usage=piece.usage)
