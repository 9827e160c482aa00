"""``POST /v1/embeddings``: vectors from the served model (mean pooled, unit length).

The embedder is a second llama context on the same weights (see
:class:`kvchat.engine.embedder.Embedder`), made at the first request and run by
the server's one embedding thread (:mod:`kvchat.server.embedding_worker`). A
request is admitted like a chat request (same slots, same per-key share), each
text counting one place (see :class:`kvchat.server.admission.Admission`), is
bounded to `max_embedding_tokens` tokens (400 beyond, counted on the work pool
before any text is evaluated), and stops between two texts when it passes the
time limit (504) or its client disconnects. Vectors
come as float lists or, with ``encoding_format="base64"`` (what the official
client asks for by default), as little-endian float32 bytes in base64.
``dimensions`` other than the model's own size is refused (400).

Decision: a request's texts go to the embedding thread in waves of as many
texts as places it holds (one job per wave), not as one job: the thread runs
jobs in arrival order, so another key's request waits for one wave of a large
request, not for all of it. A text that cannot be embedded at all (empty, or
longer than the embedding context) is reported when its wave comes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from kvchat.engine import Engine
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import APIError
from kvchat.server.runs import serving
from kvchat.server.schemas import EmbeddingRequest
from kvchat.server.state import ServerState, Tenant, authorized, server_state
from kvchat.server.work_pool import CancelCheck, work_pool

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(
    body: EmbeddingRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    state.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    limit = state.settings.max_embedding_inputs
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > limit:
        raise APIError(400, f"{len(texts)} inputs; this server embeds at most {limit} per request", param="input")
    n_embd = state.engine.model.n_embd
    if body.dimensions is not None and body.dimensions != n_embd:
        raise APIError(400, f"this model's embeddings have {n_embd} dimensions", param="dimensions")
    max_tokens = state.settings.max_embedding_tokens
    run = state.new_run(request, tenant, items=len(texts))
    with serving(run):
        await run.start()
        engine = state.engine
        await work_pool(request).run_for(run, lambda cancelled: _check_tokens(engine, texts, max_tokens, cancelled))
        width = state.admission.places(len(texts))
        waves: list[np.ndarray] = []
        prompt_tokens = 0
        for start in range(0, len(texts), width):
            job = state.embeddings.submit(texts[start : start + width], max_tokens=max_tokens)
            run.attach(job)
            result = await job.result()
            if result is None or run.error is not None:
                raise run.error or APIError(
                    503, "the server is shutting down", type="server_error", code="server_shutdown"
                )
            waves.append(result.vectors)
            prompt_tokens += result.prompt_tokens
    data = []
    for index, vector in enumerate(np.concatenate(waves)):
        encoded: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": state.settings.model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _check_tokens(engine: Engine, texts: Sequence[str], max_tokens: int, cancelled: CancelCheck) -> None:
    """400 (param ``input``) if `texts` have more than `max_tokens` tokens together,
    counted as the embedder counts them (with the model's BOS), before any text is
    evaluated; stops counting once `cancelled`."""
    total = 0
    for text in texts:
        if cancelled():
            return
        total += len(engine.model.tokenize(text, add_special=True))
        if total > max_tokens:
            raise InvalidRequestError(
                f"the inputs have more than {max_tokens} tokens; "
                f"this server embeds at most {max_tokens} tokens per request",
                field="input",
            )
