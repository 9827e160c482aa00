"""``POST /v1/embeddings``: vectors from the served model (mean pooled, unit length).

The embedder is a second llama context on the same weights (see
:class:`kvchat.engine.embedder.Embedder`), made at the first request. Vectors
come as float lists or, with ``encoding_format="base64"`` (what the official
client asks for by default), as little-endian float32 bytes in base64.
``dimensions`` other than the model's own size is refused (400).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Depends

from kvchat.server.errors import APIError, error_for
from kvchat.server.schemas import EmbeddingRequest
from kvchat.server.state import ServerState, authorized, server_state

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(
    body: EmbeddingRequest, state: ServerState = Depends(server_state), _: str | None = Depends(authorized)
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
    run = state.new_run()
    try:
        vectors, prompt_tokens = await state.embed(texts)
    except Exception as exc:  # noqa: BLE001 - typed errors become OpenAI-shaped ones
        raise error_for(exc) from None
    finally:
        run.finish()
    data = []
    for index, vector in enumerate(vectors):
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
