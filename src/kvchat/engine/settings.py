"""`EngineSettings`: the engine's tunable numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvchat.errors import InvalidRequestError
from kvchat.llama import ContextParams, Model

MAX_PARALLEL_SEQUENCES = 256  # llama_max_parallel_sequences() in this llama.cpp

DEFAULT_CACHE_DISK_BYTES = 4 << 30
"""The disk tier's default bound: 4 GiB (some 230,000 tokens of Gemma 3 270M's KV,
340,000 of Qwen2.5 0.5B's)."""
MAX_DRAFT_TOKENS = 255
"""Most `max_draft_tokens` allows: four tiles of llama.cpp's CPU attention."""


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Numbers a user may tune. The defaults suit a 2-core laptop.

    - `n_ctx`: KV cells in the shared pool (all sequences together); one request may
      use up to all of it (and no more than the model's training context).
    - `n_batch`: most tokens evaluated in one step (decode tokens + prompt chunks).
    - `n_ubatch`: most tokens llama.cpp computes at once inside a step.
    - `max_running`: requests decoded together; more wait in the queue.
    - `n_seq_max`: KV sequence ids in the context (at least `max_running`).
    - `n_threads`: CPU threads for llama.cpp (None: every core available).
    - `max_request_tokens`: most tokens (prompt + max_tokens) one request may
      hold (None: the whole pool, within the model's training context).
    - `open_max_tokens`: most tokens a request with ``max_tokens=None`` generates,
      within its context (None: until the model stops or the context is full).
    - `reservation_step`: KV cells a request reserves at a time for the tokens it
      generates. A request reserves its uncached prompt and this much at
      admission and grows by this much when it runs out; when the pool cannot
      grow it, the youngest running request is preempted (parked, resumed later).
      Requests whose `max_tokens` is at most this never grow.
    - `prefix_cache`: keep finished requests' KV and reuse the longest cached
      prefix of each new request (off for recurrent and hybrid models).
    - `cache_ram_bytes`: host-RAM budget for KV state evicted from the pool
      (0: evicted entries are dropped).
    - `compact_pool`: when a request is admitted, move the parked entries it does
      not use from the KV pool to the RAM tier while that has room (llama.cpp's
      attention costs time for every cell up to the highest one in use; a restore
      from RAM is a copy).
    - `interleaved_call_rows`: most rows of one ``llama_decode`` call while
      several requests run (None: one call per step). The default, 63, suits
      llama.cpp's CPU flash attention, which from 64 rows up works in tiles that
      rarely skip the cells of other requests (see `StepPlanner`); a GPU build
      has no reason to split a step.
    - `speculation`: ``"auto"`` (default) drafts tokens for generating requests
      (from the request's `prediction`, its own history, and an n-gram cache of
      earlier replies in its cache namespace) and verifies them in the step's
      batch, each request's draft length following its recent acceptance and
      the batch's size (drafting pauses where it does not pay); ``"off"``
      decodes one token per request per step.
    - `max_draft_tokens`: longest draft one request verifies in a step (at most
      255). The default, 63, makes a call of one tile of llama.cpp's CPU flash
      attention (64 rows; see `kvchat.engine.speculation.TILE_ROWS`).
    - `ngram_cache_entries`: bound on the n-gram cache of earlier replies (entries
      over all cache namespaces; 0: no n-gram cache).
    - `cache_dir`: a directory where state falling out of RAM is kept across
      restarts (None: no disk tier); `cache_disk_bytes` bounds the bytes of its
      files (default 4 GiB, `DEFAULT_CACHE_DISK_BYTES`; None: no bound), least
      recently used files deleted first.
    """

    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int = 512
    max_running: int = 16
    n_seq_max: int = 32
    n_threads: int | None = None
    max_request_tokens: int | None = None
    open_max_tokens: int | None = None
    reservation_step: int = 256
    prefix_cache: bool = True
    cache_ram_bytes: int = 256 * 1024 * 1024
    compact_pool: bool = True
    interleaved_call_rows: int | None = 63
    speculation: Literal["auto", "off"] = "auto"
    max_draft_tokens: int = 63
    ngram_cache_entries: int = 65_536
    cache_dir: str | None = None
    cache_disk_bytes: int | None = DEFAULT_CACHE_DISK_BYTES

    def context_params(self, model: Model) -> ContextParams:
        """The llama context an engine with these settings runs `model` on."""
        # Sliding-window models keep only the window's cells unless swa_full:
        # reusing a longer prefix needs them all.
        return ContextParams(
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            n_seq_max=self.n_seq_max,
            n_threads=self.n_threads,
            swa_full=self.prefix_cache or model.n_swa == 0,
        )

    def __post_init__(self) -> None:
        for name in ("n_ctx", "n_batch", "n_ubatch", "max_running", "n_seq_max", "reservation_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer", field=name)
        if self.n_seq_max > MAX_PARALLEL_SEQUENCES:
            raise InvalidRequestError(f"n_seq_max must be <= {MAX_PARALLEL_SEQUENCES}", field="n_seq_max")
        if self.max_running > self.n_seq_max:
            raise InvalidRequestError("max_running must be <= n_seq_max", field="max_running")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or self.n_threads < 1):
            raise InvalidRequestError("n_threads must be a positive integer or None", field="n_threads")
        if self.max_request_tokens is not None and (
            not isinstance(self.max_request_tokens, int) or not 1 <= self.max_request_tokens <= self.n_ctx
        ):
            raise InvalidRequestError("max_request_tokens must be in [1, n_ctx] or None", field="max_request_tokens")
        if self.open_max_tokens is not None and (not isinstance(self.open_max_tokens, int) or self.open_max_tokens < 1):
            raise InvalidRequestError("open_max_tokens must be a positive integer or None", field="open_max_tokens")
        if self.interleaved_call_rows is not None and (
            not isinstance(self.interleaved_call_rows, int) or self.interleaved_call_rows < 1
        ):
            raise InvalidRequestError(
                "interleaved_call_rows must be a positive integer or None", field="interleaved_call_rows"
            )
        if self.speculation not in ("auto", "off"):
            raise InvalidRequestError('speculation must be "auto" or "off"', field="speculation")
        if not isinstance(self.max_draft_tokens, int) or not 1 <= self.max_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidRequestError(
                f"max_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}]", field="max_draft_tokens"
            )
        if not isinstance(self.ngram_cache_entries, int) or self.ngram_cache_entries < 0:
            raise InvalidRequestError("ngram_cache_entries must be an integer >= 0", field="ngram_cache_entries")
        if not isinstance(self.cache_ram_bytes, int) or self.cache_ram_bytes < 0:
            raise InvalidRequestError("cache_ram_bytes must be an integer >= 0", field="cache_ram_bytes")
        if self.cache_disk_bytes is not None and (
            not isinstance(self.cache_disk_bytes, int) or self.cache_disk_bytes < 0
        ):
            raise InvalidRequestError("cache_disk_bytes must be an integer >= 0 or None", field="cache_disk_bytes")
