"""``POST /v1/embeddings``: vectors from the served model (mean pooled, unit length).

The embedder is a second llama context on the same weights (see
:class:`kvchat.engine.embedder.Embedder`), made at the first request and run by
the server's one embedding thread (:mod:`kvchat.server.embedding_worker`). A
request is admitted like a chat request (same slots, same per-key share), is
bounded to `max_embedding_tokens` tokens (400 beyond), and stops between two
texts when it passes the time limit (504) or its client disconnects. Vectors
come as float lists or, with ``encoding_format="base64"`` (what the official
client asks for by default), as little-endian float32 bytes in base64.
``dimensions`` other than the model's own size is refused (400).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Depends, Request

from kvchat.server.errors import APIError
from kvchat.server.runs import serving
from kvchat.server.schemas import EmbeddingRequest
from kvchat.server.state import ServerState, Tenant, authorized, server_state

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
    run = state.new_run(request, tenant)
    with serving(run):
        await run.start()
        job = state.embeddings.submit(texts, max_tokens=state.settings.max_embedding_tokens)
        run.attach(job)
        result = await job.result()
        if result is None or run.error is not None:
            raise run.error or APIError(503, "the server is shutting down", type="server_error", code="server_shutdown")
    data = []
    for index, vector in enumerate(result.vectors):
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
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
