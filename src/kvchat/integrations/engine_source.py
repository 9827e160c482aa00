"""What every integration shares: the engine it runs on, given by the caller (and
left open) or started on a model name (and owned), the chat runtime its chats run
on, and the name it reports.

Imports no framework."""

from __future__ import annotations

import logging
import os

from kvchat.chat.runtime import ChatRuntime
from kvchat.engine import Engine, EngineSettings
from kvchat.models import resolve

logger = logging.getLogger(__name__)

__all__ = ["check_chat_runtime", "engine_for", "model_id"]


def engine_for(
    engine: Engine | None, model: str | os.PathLike[str] | None, engine_settings: EngineSettings | None
) -> tuple[Engine, bool]:
    """`(engine, owns)`: the given `engine` (not owned), or one started on `model` (a
    packaged model name or a ``.gguf`` path) with `engine_settings`, which the caller
    owns and closes. Exactly one of `engine` and `model` must be given (else `ValueError`)."""
    if (engine is None) == (model is None):
        raise ValueError("give exactly one of engine or model")
    if engine is not None:
        return engine, False
    assert model is not None  # exactly one of them is given
    logger.info("starting a kvchat engine on %s", model)
    return Engine(resolve(model), engine_settings), True


def check_chat_runtime(engine: Engine | None, chat_runtime: ChatRuntime | None) -> None:
    """`ValueError` unless `chat_runtime` is None or runs on the given `engine` (a
    runtime cannot come with a model to start an engine on). Checked before an
    engine is started."""
    if chat_runtime is not None and chat_runtime.engine is not engine:
        raise ValueError("chat_runtime must run on the given engine")


def model_id(engine: Engine, model: str | os.PathLike[str] | None) -> str:
    """The model's name as integrations report it: the file name of `model` as given,
    else of the engine's model file ("kvchat" if it has none)."""
    if model is not None:
        return os.path.basename(os.fspath(model))
    path = getattr(engine.model, "path", None)
    return os.path.basename(os.fspath(path)) if path else "kvchat"
