"""The only package that imports `llama_cpp`: thin, typed wrappers over its C API.

- :class:`Model`: weights, vocabulary, metadata, tokenizer;
- :class:`Context` / :class:`ContextParams`: decode, unified KV cache, sequence state;
- :class:`Batch`: the token batch for one decode;
- :class:`SamplerChain`: a per-request sampler chain;
- :func:`guidance_tokenizer`: llguidance's tokenizer for a model (constrained output).

Every object frees its C memory in `close()` (and as a context manager).
"""

from kvchat.llama.backend import ensure_backend
from kvchat.llama.batch import Batch
from kvchat.llama.context import Context, ContextParams
from kvchat.llama.guidance import guidance_tokenizer
from kvchat.llama.model import Model
from kvchat.llama.sampler import SamplerChain

__all__ = [
    "Batch",
    "Context",
    "ContextParams",
    "Model",
    "SamplerChain",
    "ensure_backend",
    "guidance_tokenizer",
]
