"""`EngineService`: the part every kvchat Semantic Kernel service shares, an engine
that is either given (and left open) or started from a model name (and owned)."""

import os

from pydantic import ConfigDict, Field
from semantic_kernel.services.ai_service_client_base import AIServiceClientBase

from kvchat.engine import Engine, EngineSettings
from kvchat.integrations.engine_source import engine_for, model_id

__all__ = ["EngineService"]

# Pydantic model: annotations stay real at runtime (no `from __future__ import annotations`).


class EngineService(AIServiceClientBase):
    """A Semantic Kernel service on a kvchat :class:`Engine`.

    Give it a running `engine` (shared with other services or callers; never closed
    here), or a `model` (a packaged model name or a ``.gguf`` path), in which case
    it starts its own engine with `engine_settings`; :meth:`close` closes that one.
    `ai_model_id` defaults to the model's file name; `service_id` to `ai_model_id`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Engine = Field(exclude=True)
    owns_engine: bool = Field(default=False, exclude=True)

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model: str | os.PathLike[str] | None = None,
        engine_settings: EngineSettings | None = None,
        ai_model_id: str | None = None,
        service_id: str | None = None,
    ) -> None:
        """Wrap `engine`, or start an engine on `model`; exactly one must be given
        (else `ValueError`)."""
        engine, owns = engine_for(engine, model, engine_settings)
        try:
            super().__init__(
                engine=engine,
                owns_engine=owns,
                ai_model_id=ai_model_id or model_id(engine, model),
                service_id=service_id or "",
            )
        except BaseException:
            if owns:
                engine.close()
            raise

    def close(self) -> None:
        """Close the engine if this service started it (a given engine is left open)."""
        if self.owns_engine:
            self.engine.close()
