"""The curated public API: `kvchat.__all__` is exactly what users import."""

from __future__ import annotations

import kvchat
import kvchat.errors

EXPECTED = {
    "GREEDY", "BackendError", "ChatSession", "Chunk", "Completion", "ContextOverflowError", "Conversation",
    "ConversationFileError", "DecodeError", "Engine",
    "EngineClosedError", "EngineSettings", "EngineStats", "Grammar", "GrammarError", "InvalidRequestError", "KVChatError", "ModelLoadError",
    "ModelNotFoundError", "SamplingParams", "Stream", "Usage", "__version__",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(kvchat.__all__) == EXPECTED
    for name in kvchat.__all__:
        assert getattr(kvchat, name) is not None


def test_every_public_error_derives_from_kvchat_error() -> None:
    for name in kvchat.errors.__all__:
        assert issubclass(getattr(kvchat.errors, name), kvchat.errors.KVChatError)


def test_public_classes_have_docstrings() -> None:
    for name in kvchat.__all__:
        obj = getattr(kvchat, name)
        if isinstance(obj, type):
            assert obj.__doc__ and obj.__doc__.strip(), name
