"""`ServerSettings`: what an operator tunes about the HTTP server (not the engine)."""

from __future__ import annotations

from dataclasses import dataclass

from kvchat.errors import InvalidRequestError
from kvchat.server.ids import MAX_TAG_DIGITS, is_hex


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The server's options. The defaults protect a small (2-core) machine.

    - `model_name`: the model id clients send (and ``/v1/models`` lists).
    - `model_aliases`: other ids that name the served model (listed by
      ``/v1/models`` too), say ``claude-sonnet-4-5`` for a client that cannot be
      told another id.
    - `any_model`: answer a request for any model id with the served model (off:
      an unknown id gets 404 ``model_not_found``).
    - `api_keys`: if any, every ``/v1`` request needs ``Authorization: Bearer <key>``
      or ``x-api-key: <key>``.
    - `isolate_api_keys`: with API keys, each key is a cache namespace of its own
      (on by default): cached prefixes, speculation's n-gram drafts and acceptance
      rates, and the generated-token memory are that key's only. Off, all keys
      share them (outputs included, not only prefixes).
    - `max_queued`: requests allowed to wait beyond the engine's running ones;
      past that the server answers 429 with ``Retry-After: retry_after`` seconds.
    - `key_share`: with two or more `api_keys`, the share (0 to 1) of the running
      places (the engine's `max_running`) and of the queue (`max_queued`) that one
      key's requests may hold, each rounded up (at least one running place);
      past it that key gets 429 while other keys are still served. With one key or
      none there is one tenant, who may use the whole server (see
      :class:`kvchat.server.admission.Admission`).
    - `request_timeout`: seconds a request may take, queueing included (None: no
      limit); past it the request is cancelled and ends with a ``request_timeout`` error.
    - `max_body_bytes`: largest request body (413 beyond it).
    - `max_tokens_limit`: most tokens one request may ask for (a larger
      `max_tokens` is rejected; None: no limit). A request that sets no limit is
      bounded by the engine's `EngineSettings.open_max_tokens` (`kvchat serve`
      sets both from `--max-tokens`).
    - `max_tools`: most tool definitions in one request.
    - `temperature`: the sampling temperature of a request that sets none (None:
      :class:`~kvchat.engine.sampling.SamplingParams`' default). Coding agents
      such as Codex CLI and Claude Code never send one; 0 makes their turns greedy.
    - `max_embedding_inputs`: most texts in one ``/v1/embeddings`` request.
    - `max_embedding_tokens`: most tokens (all texts together) in one
      ``/v1/embeddings`` request (400 beyond it; each text is also bounded by the
      embedding context).
    - `allowed_hosts`: host names (besides the loopback ones, always allowed:
      ``localhost``, ``127.0.0.1`` and the rest of 127.0.0.0/8, ``[::1]``) that a
      request's ``Host`` header may name, with any port; ``*.example.com`` allows
      the subdomains of example.com, ``*`` any host. Refusing other names stops
      DNS rebinding: a web page whose name resolves to this machine cannot reach
      the server through the user's browser (403 otherwise).
    - `cors_origins`: origins allowed by CORS (none: CORS headers are not sent).
    - `shutdown_grace`: seconds in-flight requests may run on after a shutdown
      signal (3 by default, so that the server is gone within 5 s of SIGTERM, and
      before a container runtime's usual 10 s before SIGKILL); requests still
      running then are cancelled: a 503 ``server_shutdown``, or that error event
      in a stream.
    - `responses_store_max`: most stored ``/v1/responses`` responses (the ones
      ``previous_response_id`` and ``GET /v1/responses/{id}`` can reach; 0 stores
      none); beyond it, the least recently used go first.
    - `responses_store_bytes`: bound on the stored responses' size (their
      conversations' text, roughly in bytes); beyond it, the least recently used go first.
    - `responses_store_ttl`: seconds a stored response lives after it was made.
      With two or more `api_keys`, one key's responses hold at most its
      `key_share` of the count and of the bytes (see
      :class:`kvchat.server.response_store.ResponseStore`).
    - `work_threads`: threads of the server's work pool, which renders chat
      templates, fits overflowing conversations and tokenizes prompts off the
      event loop (see :class:`kvchat.server.work_pool.WorkPool`).
    - `work_queue`: jobs that may wait for a pool thread; past that a request gets
      503 ``server_busy`` with ``Retry-After: retry_after`` seconds.
    - `response_id_tag`: hex digits (even count, at most 16) that begin the random
      part of every response id this server makes: on Ray Serve each replica
      has its own, so a ``previous_response_id`` names the replica that stored it.
    """

    model_name: str
    model_aliases: tuple[str, ...] = ()
    any_model: bool = False
    api_keys: tuple[str, ...] = ()
    isolate_api_keys: bool = True
    max_queued: int = 64
    key_share: float = 0.5
    retry_after: int = 1
    request_timeout: float | None = 600.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int | None = 4096
    max_tools: int = 128
    temperature: float | None = None
    max_embedding_inputs: int = 256
    max_embedding_tokens: int = 32768
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    shutdown_grace: float = 3.0
    responses_store_max: int = 1024
    responses_store_bytes: int = 64 * 1024 * 1024
    responses_store_ttl: float = 6 * 3600.0
    response_id_tag: str = ""
    work_threads: int = 4
    work_queue: int = 64

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The ids that name the served model: `model_name`, then the `model_aliases`."""
        return (self.model_name, *self.model_aliases)

    def serves(self, model: str) -> bool:
        """Whether a request for the id `model` is answered by the served model."""
        return self.any_model or model in self.model_ids

    def __post_init__(self) -> None:
        if not self.model_name:
            raise InvalidRequestError("model_name must not be empty", field="model_name")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if any(not alias for alias in self.model_aliases):
            raise InvalidRequestError("model aliases must not be empty", field="model_aliases")
        aliases = dict.fromkeys(alias for alias in self.model_aliases if alias != self.model_name)
        object.__setattr__(self, "model_aliases", tuple(aliases))
        tag = self.response_id_tag
        if len(tag) > MAX_TAG_DIGITS or len(tag) % 2 or not is_hex(tag):
            raise InvalidRequestError(
                f"response_id_tag must be an even number (at most {MAX_TAG_DIGITS}) of lowercase hex digits",
                field="response_id_tag",
            )
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "allowed_hosts", tuple(host.strip().lower() for host in self.allowed_hosts))
        if any(not key for key in self.api_keys):
            raise InvalidRequestError("API keys must not be empty", field="api_keys")
        for name in (
            "max_queued",
            "retry_after",
            "max_tools",
            "max_embedding_inputs",
            "responses_store_max",
            "work_queue",
        ):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0", field=name)
        for name in ("max_body_bytes", "max_embedding_tokens", "responses_store_bytes", "work_threads"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1", field=name)
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise InvalidRequestError("max_tokens_limit must be >= 1 or None", field="max_tokens_limit")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise InvalidRequestError("request_timeout must be > 0 or None", field="request_timeout")
        if not self.responses_store_ttl > 0:
            raise InvalidRequestError("responses_store_ttl must be > 0", field="responses_store_ttl")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise InvalidRequestError("temperature must be between 0 and 2, or None", field="temperature")
        if self.shutdown_grace < 0:
            raise InvalidRequestError("shutdown_grace must be >= 0", field="shutdown_grace")
        if not 0 < self.key_share <= 1:
            raise InvalidRequestError("key_share must be > 0 and <= 1", field="key_share")
        for host in self.allowed_hosts:
            if not host or "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise InvalidRequestError(
                    f"allowed host {host!r} must be a host name, '*.domain' or '*'", field="allowed_hosts"
                )
