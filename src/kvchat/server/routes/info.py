"""``GET /health``, ``GET /v1/models``, ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from kvchat.server.errors import APIError
from kvchat.server.metrics import CONTENT_TYPE_LATEST
from kvchat.server.state import ServerState, Tenant, authorized, server_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """Up and able to serve (503 once the engine is closed). Needs no API key."""
    if state.engine.closed:
        raise APIError(503, "the model is not available", type="server_error", code="engine_closed")
    stats = state.engine.stats()
    return {"status": "ok", "model": state.settings.model_name, "active": stats.active, "queued": stats.queued}


@router.get("/metrics")
async def metrics(state: ServerState = Depends(server_state)) -> Response:
    """Prometheus metrics (no API key: they carry counts, never content)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(_: Tenant = Depends(authorized), state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """The served model, under its name and each of its aliases."""
    return {"object": "list", "data": [_model_card(state, model_id) for model_id in state.settings.model_ids]}


@router.get("/v1/models/{model_id:path}")
async def model(
    model_id: str, _: Tenant = Depends(authorized), state: ServerState = Depends(server_state)
) -> dict[str, Any]:
    """The served model under the id asked for (its name, an alias, or any id with `any_model`)."""
    state.check_model(model_id)
    return _model_card(state, model_id)


def _model_card(state: ServerState, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": state.created, "owned_by": "kvchat"}
