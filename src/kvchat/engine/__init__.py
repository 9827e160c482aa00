"""Continuous batching over one llama context.

- :class:`Engine`: the worker thread and `submit()`;
- :class:`Conversation`: an explicit handle on one pinned KV sequence;
- :class:`SamplingParams` (with a :class:`Grammar` for constrained output),
  :class:`EngineSettings`, :class:`EngineStats`;
- :class:`Stream`, :class:`Chunk`, :class:`Usage`, :class:`Completion`: what a request returns.
"""

from kvchat.engine.context_shift import ContextShift
from kvchat.engine.conversation import Conversation
from kvchat.engine.engine import Engine
from kvchat.engine.grammar import Grammar
from kvchat.engine.sampling import GREEDY, SamplingParams
from kvchat.engine.settings import EngineSettings
from kvchat.engine.stats import EngineStats, StepTiming
from kvchat.engine.stream import Chunk, Completion, FinishReason, Stream, Usage

__all__ = [
    "GREEDY",
    "Chunk",
    "Completion",
    "ContextShift",
    "Conversation",
    "Engine",
    "EngineSettings",
    "EngineStats",
    "StepTiming",
    "FinishReason",
    "Grammar",
    "SamplingParams",
    "Stream",
    "Usage",
]
