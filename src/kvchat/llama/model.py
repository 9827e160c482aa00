"""`Model`: model weights, vocabulary and metadata of one GGUF file."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import llama_cpp

from kvchat.errors import InvalidRequestError, ModelLoadError
from kvchat.llama.backend import ensure_backend

_GGUF_MAGIC = b"GGUF"
_PIECE_BUFFER_BYTES = 64
"""A first guess at one token's text size; a longer piece gets a buffer of its exact size."""


class Model:
    """A loaded GGUF model: weights, vocabulary, metadata and tokenizer.

    Free it with :meth:`close` or use it as a context manager; contexts created on
    it must be closed first. The vocabulary calls (tokenize, detokenize,
    token_to_bytes and the token predicates) may run in several threads at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, use_mmap: bool = True) -> None:
        self.path = Path(path)
        _check_gguf_file(self.path)
        ensure_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = use_mmap
        # llama.cpp's AMX matrix kernels end the process with a segmentation fault on
        # the Xeon VMs this project runs on; without extra buffer types the weights
        # stay in plain CPU buffers (`make setup` builds llama.cpp without AMX, which
        # keeps the faster repacked buffers).
        params.use_extra_bufts = not _built_with_amx()
        handle = llama_cpp.llama_model_load_from_file(os.fsencode(self.path), params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load the model file {self.path}", path=self.path)
        self._handle = handle
        self._vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(handle)
        self.n_embd: int = llama_cpp.llama_model_n_embd(handle)
        self.n_swa: int = llama_cpp.llama_model_n_swa(handle)
        self.is_recurrent: bool = bool(llama_cpp.llama_model_is_recurrent(handle))
        self.is_hybrid: bool = bool(llama_cpp.llama_model_is_hybrid(handle))
        self.bos_token: int = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_token: int = llama_cpp.llama_vocab_eos(self._vocab)
        self.adds_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.metadata: dict[str, str] = self._read_metadata()
        self.description: str = self._read_description()
        self._sha256: str | None = None

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Free the weights. Safe to call twice."""
        if getattr(self, "_handle", None):
            llama_cpp.llama_model_free(self._handle)
            self._handle = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return not getattr(self, "_handle", None)

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def handle(self) -> llama_cpp.llama_model_p:
        """The raw `llama_model *`, for the other wrappers in this package only."""
        if not self._handle:
            raise ModelLoadError(f"model {self.path} is closed", path=self.path)
        return self._handle

    @property
    def vocab_handle(self) -> llama_cpp.llama_vocab_p:
        """The raw `llama_vocab *`, for the other wrappers in this package only."""
        _ = self.handle  # raises if closed
        return self._vocab

    def sha256(self) -> str:
        """The model file's sha256 (computed once, on first use)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with self.path.open("rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    # -- vocabulary ---------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the GGUF file, if any."""
        return self.metadata.get("tokenizer.chat_template")

    def is_end_of_generation(self, token: int) -> bool:
        """True for tokens that end a generation (EOS, EOT, end-of-turn tokens)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, self._in_vocabulary(token)))

    def is_control(self, token: int) -> bool:
        """True for control tokens (BOS, role markers and the like)."""
        return bool(llama_cpp.llama_vocab_is_control(self._vocab, self._in_vocabulary(token)))

    def _in_vocabulary(self, token: int) -> int:
        """`token`, or `ValueError` if it is not a token id of this model: llama.cpp's
        vocabulary lookups abort the whole process on an id out of range."""
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token id {token} is not in this model's vocabulary [0, {self.n_vocab})")
        return token

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Text to token ids.

        `add_special` adds BOS/EOS where the model expects them. `parse_special`
        turns special-token text such as ``<|im_start|>`` into its single token;
        without it such text is tokenized as ordinary characters. Text that is
        not valid Unicode (a lone surrogate) raises `InvalidRequestError`.
        """
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"the text is not valid Unicode: {exc.reason} at index {exc.start}", field="text"
            ) from None
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            raise ModelLoadError(f"tokenization failed for a text of {len(data)} bytes", path=self.path)
        return tokens[:n]

    def token_to_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token's text. Control tokens give b"" unless `special`;
        an id outside the vocabulary raises `ValueError`.

        Thread-safe: every call writes into a buffer of its own (ctypes releases
        the GIL during the llama.cpp call, so a shared buffer would let another
        thread's piece overwrite this one before it is read).
        """
        token = self._in_vocabulary(token)
        buffer = ctypes.create_string_buffer(_PIECE_BUFFER_BYTES)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Token ids to text (invalid UTF-8 is replaced)."""
        data = b"".join(self.token_to_bytes(t, special=special) for t in tokens)
        return data.decode("utf-8", errors="replace")

    # -- metadata -------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, str]:
        metadata: dict[str, str] = {}
        for i in range(llama_cpp.llama_model_meta_count(self._handle)):
            key = _read_c_string(functools.partial(llama_cpp.llama_model_meta_key_by_index, self._handle, i))
            value = _read_c_string(functools.partial(llama_cpp.llama_model_meta_val_str_by_index, self._handle, i))
            metadata[key] = value
        return metadata

    def _read_description(self) -> str:
        return _read_c_string(lambda buf, size: llama_cpp.llama_model_desc(self._handle, buf, size))

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {self.description!r})"


def _read_c_string(read: Callable[[ctypes.Array[ctypes.c_char], int], int]) -> str:
    """Call a snprintf-style llama.cpp getter, growing the buffer when it is too small."""
    size = 256
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = read(buffer, size)
        if n < 0:
            return ""
        if n < size:
            return buffer.value.decode("utf-8", errors="replace")
        size = n + 1


@functools.cache
def _built_with_amx() -> bool:
    """Whether llama.cpp was compiled with its AMX kernels (and runs on a CPU that has AMX)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}", path=path)
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}", path=path) from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF model file (bad magic {magic!r})", path=path)
