"""``kvchat serve``: the OpenAI-compatible server on one model.

Every option can also come from an environment variable (``KVCHAT_<OPTION>``,
shown in ``--help``); a command-line value wins. An option that sets a field of
`ServerSettings` or `EngineSettings` takes its default from that field (in the
option's unit: ``--max-body 4M``, ``--request-timeout 0`` for no limit), so each
default is written once, in the settings class. What it starts comes from the
command's :class:`~kvchat.cli.runtime.Runtime`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from kvchat.cli.runtime import Runtime, runtime_of
from kvchat.cli.sizes import format_size, parse_size
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.settings import EngineSettings
from kvchat.errors import KVChatError
from kvchat.models import DEFAULT_CHAT_MODEL
from kvchat.server.settings import ServerSettings


def _defaults(settings: type[EngineSettings] | type[ServerSettings] | type[SamplingParams]) -> dict[str, Any]:
    """The defaults of `settings`' fields, by name (the options below take theirs from here)."""
    return {field.name: field.default for field in dataclasses.fields(settings)}


_ENGINE = _defaults(EngineSettings)
_SERVER = _defaults(ServerSettings)
_SAMPLING = _defaults(SamplingParams)


def _seconds(limit: float | None) -> float:
    """A time limit as its option takes it: seconds, 0 for None (no limit)."""
    return 0.0 if limit is None else float(limit)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def serve(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", "-m", envvar="KVCHAT_MODEL", help="Packaged model name or path to a .gguf file.")
    ] = DEFAULT_CHAT_MODEL,
    model_name: Annotated[
        str | None,
        typer.Option(
            envvar="KVCHAT_MODEL_NAME", help="Model id clients send (default: the model's name or file stem)."
        ),
    ] = None,
    model_alias: Annotated[
        list[str] | None,
        typer.Option(
            envvar="KVCHAT_MODEL_ALIAS",
            help="Another model id that names the served model, listed by /v1/models (repeatable; "
            "env: space-separated).",
        ),
    ] = None,
    any_model: Annotated[
        bool,
        typer.Option(
            "--any-model",
            envvar="KVCHAT_ANY_MODEL",
            help="Answer a request for any model id with the served model (default: 404 for unknown ids).",
        ),
    ] = _SERVER["any_model"],
    host: Annotated[
        str, typer.Option(envvar="KVCHAT_HOST", help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="KVCHAT_PORT", min=0, max=65535)] = 8000,
    ctx_size: Annotated[
        int, typer.Option(envvar="KVCHAT_CTX_SIZE", min=16, help="KV cells shared by all requests.")
    ] = _ENGINE["n_ctx"],
    parallel: Annotated[
        int,
        typer.Option(
            envvar="KVCHAT_PARALLEL", min=1, max=128, help="Requests decoded together; more wait in the queue."
        ),
    ] = _ENGINE["max_running"],
    max_queued: Annotated[
        int, typer.Option(envvar="KVCHAT_MAX_QUEUED", min=0, help="Requests that may wait; beyond them: 429.")
    ] = _SERVER["max_queued"],
    key_share: Annotated[
        float,
        typer.Option(
            envvar="KVCHAT_KEY_SHARE",
            min=0.01,
            max=1.0,
            help="With several API keys: share of --parallel and of --max-queued one key may hold; beyond: 429.",
        ),
    ] = _SERVER["key_share"],
    cache_ram: Annotated[
        str, typer.Option(envvar="KVCHAT_CACHE_RAM", help="Host RAM for KV state evicted from the pool (0: none).")
    ] = format_size(_ENGINE["cache_ram_bytes"]),
    cache_dir: Annotated[
        Path | None,
        typer.Option(envvar="KVCHAT_CACHE_DIR", help="Directory that keeps cached KV state across restarts."),
    ] = _ENGINE["cache_dir"],
    cache_disk: Annotated[
        str, typer.Option(envvar="KVCHAT_CACHE_DISK", help="Bound on --cache-dir's size (oldest files go first).")
    ] = format_size(_ENGINE["cache_disk_bytes"]),
    speculation: Annotated[
        Literal["auto", "off"],
        typer.Option(
            envvar="KVCHAT_SPECULATION",
            help="Speculative decoding: 'auto' drafts tokens (from a request's prediction, its own text and "
            "earlier replies) where it pays; 'off' decodes one token per step.",
        ),
    ] = _ENGINE["speculation"],
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            envvar="KVCHAT_API_KEY",
            help="Require 'Authorization: Bearer KEY' or 'x-api-key: KEY' (repeatable; env: space-separated).",
        ),
    ] = None,
    share_cache_between_keys: Annotated[
        bool,
        typer.Option(
            envvar="KVCHAT_SHARE_CACHE_BETWEEN_KEYS",
            help="One cache namespace for all API keys: they share cached prefixes and what earlier replies left "
            "(speculation's n-gram drafts and acceptance rates, the generated-token memory), so one key's "
            "timing can reveal another's prompts and replies.",
        ),
    ] = not _SERVER["isolate_api_keys"],
    max_tokens: Annotated[
        int, typer.Option(envvar="KVCHAT_MAX_TOKENS", min=1, help="Most tokens one request may generate.")
    ] = _SERVER["max_tokens_limit"],
    temperature: Annotated[
        float | None,
        typer.Option(
            envvar="KVCHAT_TEMPERATURE",
            min=0,
            max=2,
            help="Sampling temperature of a request that sets none (default: "
            f"{_SAMPLING['temperature']}; coding agents never set one, 0 makes them greedy).",
        ),
    ] = _SERVER["temperature"],
    request_timeout: Annotated[
        float, typer.Option(envvar="KVCHAT_REQUEST_TIMEOUT", min=0, help="Seconds a request may take (0: no limit).")
    ] = _seconds(_SERVER["request_timeout"]),
    max_body: Annotated[str, typer.Option(envvar="KVCHAT_MAX_BODY", help="Largest request body.")] = format_size(
        _SERVER["max_body_bytes"]
    ),
    max_embedding_tokens: Annotated[
        int,
        typer.Option(envvar="KVCHAT_MAX_EMBEDDING_TOKENS", min=1, help="Most tokens in one /v1/embeddings request."),
    ] = _SERVER["max_embedding_tokens"],
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            envvar="KVCHAT_ALLOWED_HOST",
            help="Answer requests for this Host name too, besides localhost (repeatable; '*': any; "
            "env: space-separated).",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(envvar="KVCHAT_CORS_ORIGIN", help="Allow this browser origin (repeatable; default: CORS off)."),
    ] = None,
    shutdown_grace: Annotated[
        float, typer.Option(envvar="KVCHAT_SHUTDOWN_GRACE", min=0, help="Seconds in-flight requests get on shutdown.")
    ] = _SERVER["shutdown_grace"],
    responses_store_max: Annotated[
        int,
        typer.Option(
            envvar="KVCHAT_RESPONSES_STORE_MAX",
            min=0,
            help="Most stored /v1/responses responses (previous_response_id, GET); 0: none.",
        ),
    ] = _SERVER["responses_store_max"],
    responses_store_bytes: Annotated[
        str,
        typer.Option(envvar="KVCHAT_RESPONSES_STORE_BYTES", help="Bound on the stored responses' size (text)."),
    ] = format_size(_SERVER["responses_store_bytes"]),
    responses_store_ttl: Annotated[
        float,
        typer.Option(envvar="KVCHAT_RESPONSES_STORE_TTL", min=1, help="Seconds a stored response is kept."),
    ] = _SERVER["responses_store_ttl"],
    threads: Annotated[
        int | None, typer.Option(envvar="KVCHAT_THREADS", min=1, help="CPU threads (default: every core).")
    ] = _ENGINE["n_threads"],
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            envvar="KVCHAT_RAY",
            help="Serve --replicas engine replicas on Ray Serve behind prefix-affinity routing (needs kvchat[ray]).",
        ),
    ] = False,
    replicas: Annotated[
        int, typer.Option(envvar="KVCHAT_REPLICAS", min=1, help="With --ray: engine replicas (one process each).")
    ] = 2,
    replica_cpus: Annotated[
        float, typer.Option(envvar="KVCHAT_REPLICA_CPUS", min=0.01, help="With --ray: CPUs Ray reserves per replica.")
    ] = 1.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="KVCHAT_RAY_ADDRESS", help="With --ray: join this Ray cluster (default: start a local instance)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="KVCHAT_LOG_LEVEL")] = "info",
    access_log: Annotated[
        bool, typer.Option(envvar="KVCHAT_ACCESS_LOG", help="One JSON line per request on stderr.")
    ] = True,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions and more)."""
    from kvchat.server import default_model_name

    runtime = runtime_of(ctx)
    try:
        engine_settings = EngineSettings(
            n_ctx=ctx_size,
            max_running=parallel,
            n_seq_max=min(2 * parallel, 256),
            n_threads=threads,
            open_max_tokens=max_tokens,
            cache_ram_bytes=_size(cache_ram),
            cache_dir=str(cache_dir) if cache_dir else None,
            cache_disk_bytes=_size(cache_disk),
            speculation=speculation,
        )
        settings = ServerSettings(
            model_name=model_name or default_model_name(model),
            model_aliases=tuple(model_alias or ()),
            any_model=any_model,
            api_keys=tuple(api_key or ()),
            isolate_api_keys=not share_cache_between_keys,
            max_queued=max_queued,
            key_share=key_share,
            max_tokens_limit=max_tokens,
            temperature=temperature,
            request_timeout=request_timeout or None,
            max_body_bytes=_size(max_body),
            max_embedding_tokens=max_embedding_tokens,
            allowed_hosts=tuple(allowed_host or ()),
            cors_origins=tuple(cors_origin or ()),
            shutdown_grace=shutdown_grace,
            responses_store_max=responses_store_max,
            responses_store_bytes=_size(responses_store_bytes),
            responses_store_ttl=responses_store_ttl,
        )
        if ray:
            _serve_on_ray(
                runtime,
                model,
                settings=settings,
                engine_settings=engine_settings,
                host=host,
                port=port,
                replicas=replicas,
                replica_cpus=replica_cpus,
                address=ray_address,
            )
            return
        runtime.serve(
            model,
            host=host,
            port=port,
            settings=settings,
            engine_settings=engine_settings,
            log_level=log_level,
            access_log=access_log,
        )
    except KVChatError as exc:
        typer.secho(f"kvchat serve: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None


def _serve_on_ray(
    runtime: Runtime,
    model: str,
    *,
    settings: ServerSettings,
    engine_settings: EngineSettings,
    host: str,
    port: int,
    replicas: int,
    replica_cpus: float,
    address: str | None,
) -> None:
    """``kvchat serve --ray``: the same API, on `replicas` engine replicas on Ray Serve.
    As without ``--ray``, a specific `host` to bind is an allowed ``Host`` name too."""
    import dataclasses
    import math

    try:
        from kvchat.server.ray_serve.app import allow_bound_host
    except ImportError as exc:
        raise KVChatError(f"--ray needs Ray Serve: pip install 'kvchat[ray]' ({exc})") from None
    if engine_settings.n_threads is None:
        # Each replica is one process: its threads follow the CPUs Ray gives it.
        engine_settings = dataclasses.replace(engine_settings, n_threads=max(1, math.floor(replica_cpus)))
    application = runtime.build_ray_app(
        model,
        server_settings=allow_bound_host(settings, host),
        engine_settings=engine_settings,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
    )
    runtime.run_ray(application, host=host, port=port, address=address)
