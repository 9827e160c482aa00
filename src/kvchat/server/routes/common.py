"""Small translations shared by the completion routes."""

from __future__ import annotations

from typing import Any

from kvchat.engine import Usage


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish reason for kvchat's (a request cancelled by the server stopped)."""
    return "stop" if reason == "cancelled" else reason


def openai_usage(usage: Usage) -> dict[str, Any]:
    """A `Usage` in OpenAI's shape, with the cached prompt tokens and the drafts.

    ``accepted_prediction_tokens`` / ``rejected_prediction_tokens`` are the
    engine's verified draft tokens that matched the output and those that did
    not, whatever drafted them (the request's ``prediction``, its own tokens, the
    n-gram cache): with or without a prediction, they say what speculation did.
    Unlike OpenAI's, rejected tokens are not billed as completion tokens.
    ``forced_tokens`` (kvchat's own) are the completion tokens that the request's
    grammar (``response_format``, a forced tool call) allowed alone: appended
    without a sampling step.
    """
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": usage.accepted_draft_tokens,
            "rejected_prediction_tokens": usage.rejected_draft_tokens,
            "forced_tokens": usage.forced_tokens,
        },
    }
