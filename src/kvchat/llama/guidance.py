"""llguidance's tokenizer for a loaded model, built from the model's own vocabulary.

llguidance computes which tokens a grammar allows next; it needs every token's
bytes, which it reads from the llama.cpp vocabulary, and llama.cpp's tokenizer for
the bytes a grammar forces. Building it reads the whole vocabulary (about 0.7 s
for Qwen's 151,936 tokens), so it is built once per model, on first use.

Control tokens are marked as special (their bytes prefixed with 0xff), so no text
in a grammar matches them and a grammar names them as ``<[id]>``. A user-defined
token (Qwen's ``<tool_call>``) keeps its text as its bytes: llama.cpp's tokenizer
turns that text into that token wherever it appears, and llguidance takes the
tokenizer's spelling of a grammar's forced text as the one to allow (marked
special, the token the tokenizer gives for the text ``<tool_call>`` would be one
the grammar then refuses). This differs from `llguidance.llamacpp`, which marks
user-defined tokens that look like tags too.
"""

from __future__ import annotations

import ctypes
import threading
import weakref

import llama_cpp
from llguidance import LLTokenizer

from kvchat.llama.model import Model

__all__ = ["guidance_tokenizer"]

_SPECIAL = b"\xff"
"""llguidance's mark for a special token's bytes."""

_tokenizers: weakref.WeakKeyDictionary[Model, LLTokenizer] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def guidance_tokenizer(model: Model) -> LLTokenizer:
    """llguidance's tokenizer for `model` (built on the first call, then shared).

    Every end-of-generation token of the model (Qwen's ``<|im_end|>`` and
    ``<|endoftext|>``) counts as an end of sequence: a grammar that is complete
    allows each of them. The tokenizer calls into the model's vocabulary, so
    it must not outlive the model; matchers built on it live no longer than
    the engine's requests.
    """
    with _lock:
        tokenizer = _tokenizers.get(model)
        if tokenizer is None:
            tokenizer = _tokenizers[model] = _build(model)
        return tokenizer


def _build(model: Model) -> LLTokenizer:
    vocab = model.vocab_handle
    tokens: list[bytes] = []
    ends: list[int] = []
    for token in range(model.n_vocab):
        piece = model.token_to_bytes(token, special=True)
        tokens.append(_SPECIAL + piece if model.is_control(token) else piece)
        if model.is_end_of_generation(token):
            ends.append(token)
    if model.eos_token in ends:  # llguidance's main end token first
        ends.remove(model.eos_token)
        ends.insert(0, model.eos_token)
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=ends or model.eos_token, slices=None
    )
