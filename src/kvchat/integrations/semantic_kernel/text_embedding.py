"""`KVTextEmbedding`: a Semantic Kernel embedding service on a local GGUF model.

It shares the model's weights with any engine on the same model (give it the
engine or the :class:`~kvchat.llama.Model`) and owns an
:class:`~kvchat.engine.embedder.Embedder`: a small embedding context of its own,
apart from the engine's context and KV cache.
"""

import logging
import os
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field
from semantic_kernel.connectors.ai.embedding_generator_base import EmbeddingGeneratorBase
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings

from kvchat.engine import Engine
from kvchat.engine.embedder import Embedder
from kvchat.llama import Model

logger = logging.getLogger(__name__)

__all__ = ["KVTextEmbedding"]

# Pydantic model: annotations stay real at runtime (no `from __future__ import annotations`).


class KVTextEmbedding(EmbeddingGeneratorBase):
    """Text embeddings (mean-pooled, unit L2 norm, float32) from a local GGUF model.

    Give exactly one of:

    - `engine`: a running :class:`Engine`; its model's weights are shared;
    - `model`: a loaded :class:`Model` (shared), or a packaged model name or a
      ``.gguf`` path (loaded here and owned).

    :meth:`close` frees the embedder, and the model if this service loaded it;
    a given engine or model is left open. `embedder_options` go to
    :class:`Embedder` (``n_ctx``, ``n_batch``, ``pack_texts``, ...).
    `ai_model_id` defaults to the model's file name.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    embedder: Embedder = Field(exclude=True)
    owns_model: bool = Field(default=False, exclude=True)

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model: Model | str | os.PathLike[str] | None = None,
        embedder_options: dict[str, Any] | None = None,
        ai_model_id: str | None = None,
        service_id: str | None = None,
    ) -> None:
        """Embed with `engine`'s model or with `model`; exactly one must be given
        (else `ValueError`)."""
        if (engine is None) == (model is None):
            raise ValueError("give exactly one of engine or model")
        owns_model = False
        if engine is not None:
            loaded = engine.model
        elif isinstance(model, Model):
            loaded = model
        else:
            from kvchat.models import resolve

            assert model is not None  # nosec
            logger.info("loading %s for embeddings", model)
            loaded = Model(resolve(model))
            owns_model = True
        embedder: Embedder | None = None
        try:
            embedder = Embedder(loaded, **(embedder_options or {}))
            super().__init__(
                embedder=embedder,
                owns_model=owns_model,
                ai_model_id=ai_model_id or os.path.basename(os.fspath(loaded.path)),
                service_id=service_id or "",
            )
        except BaseException:
            if embedder is not None:
                embedder.close()
            if owns_model:
                loaded.close()
            raise

    async def generate_embeddings(
        self,
        texts: list[str],
        settings: PromptExecutionSettings | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed `texts` on a thread that ends with the call: float32 array of shape
        ``(len(texts), n_embd)`` (a pooled thread would keep an OpenMP team and
        slow an engine's decode in the same process; see `Embedder`).

        `settings` and `kwargs` are accepted for the interface and not used (the
        embedding has no options per call). Raises
        :class:`kvchat.errors.ContextOverflowError` for a text longer than the
        embedder's context.
        """
        return await self.embedder.embed_async(list(texts))

    def close(self) -> None:
        """Free the embedder, and the model if this service loaded it."""
        self.embedder.close()
        if self.owns_model:
            self.embedder.model.close()
