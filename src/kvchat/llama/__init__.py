"""The only package that imports `llama_cpp`: thin, typed wrappers over its C API.

- :class:`Model`: weights, vocabulary, metadata, tokenizer;
- :class:`Context` / :class:`ContextParams`: decode, unified KV cache, sequence state;
- :class:`Batch`: the token batch for one decode;
- :class:`SamplerChain`: a per-request sampler chain;
- :func:`json_schema_to_grammar`: GBNF for constrained (JSON) output;
  :func:`check_json_schema` and :func:`check_grammar`: the bounds on schemas and grammars.

Every object frees its C memory in `close()` (and as a context manager).
"""

from kvchat.llama.backend import ensure_backend
from kvchat.llama.batch import Batch
from kvchat.llama.context import Context, ContextParams
from kvchat.llama.grammar import ANY_JSON_OBJECT, check_grammar, check_json_schema, json_schema_to_grammar
from kvchat.llama.model import Model
from kvchat.llama.sampler import SamplerChain

__all__ = [
    "ANY_JSON_OBJECT",
    "Batch",
    "Context",
    "ContextParams",
    "Model",
    "SamplerChain",
    "check_grammar",
    "check_json_schema",
    "ensure_backend",
    "json_schema_to_grammar",
]
