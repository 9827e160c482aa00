"""`kvchat serve`'s defaults are the settings classes' (issue 30, item 8): an option
that sets a `ServerSettings` or `EngineSettings` field takes its default from that
field, so the two cannot drift apart. No model, no process."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

import kvchat.cli.serve
from kvchat.cli import app
from kvchat.cli.runtime import Runtime
from kvchat.cli.sizes import format_size, parse_size
from kvchat.engine import EngineSettings
from kvchat.models import DEFAULT_CHAT_MODEL
from kvchat.server import ServerSettings


def _same(value: Any) -> Any:
    return value


def _keys(value: list[str] | None) -> tuple[str, ...]:
    return tuple(value or ())


SETTINGS_OPTIONS: dict[str, tuple[type[Any], str, Callable[[Any], Any]]] = {
    # option: (settings class, field, the option's value as serve() passes it to the field)
    "ctx_size": (EngineSettings, "n_ctx", _same),
    "parallel": (EngineSettings, "max_running", _same),
    "threads": (EngineSettings, "n_threads", _same),
    "cache_ram": (EngineSettings, "cache_ram_bytes", parse_size),
    "cache_dir": (EngineSettings, "cache_dir", lambda path: str(path) if path else None),
    "cache_disk": (EngineSettings, "cache_disk_bytes", parse_size),
    "speculation": (EngineSettings, "speculation", _same),
    "model_alias": (ServerSettings, "model_aliases", _keys),
    "any_model": (ServerSettings, "any_model", _same),
    "api_key": (ServerSettings, "api_keys", _keys),
    "share_cache_between_keys": (ServerSettings, "isolate_api_keys", lambda share: not share),
    "max_queued": (ServerSettings, "max_queued", _same),
    "key_share": (ServerSettings, "key_share", _same),
    "max_tokens": (ServerSettings, "max_tokens_limit", _same),
    "temperature": (ServerSettings, "temperature", _same),
    "request_timeout": (ServerSettings, "request_timeout", lambda seconds: seconds or None),
    "max_body": (ServerSettings, "max_body_bytes", parse_size),
    "max_embedding_tokens": (ServerSettings, "max_embedding_tokens", _same),
    "allowed_host": (ServerSettings, "allowed_hosts", _keys),
    "cors_origin": (ServerSettings, "cors_origins", _keys),
    "shutdown_grace": (ServerSettings, "shutdown_grace", _same),
    "responses_store_max": (ServerSettings, "responses_store_max", _same),
    "responses_store_bytes": (ServerSettings, "responses_store_bytes", parse_size),
    "responses_store_ttl": (ServerSettings, "responses_store_ttl", _same),
}
OTHER_OPTIONS = frozenset(
    # no settings field (or none with a default: model_name's comes from the model)
    {"model", "model_name", "host", "port", "ray", "replicas", "replica_cpus", "ray_address", "log_level", "access_log"}
)


def _field_default(settings: type[Any], name: str) -> Any:
    return {field.name: field for field in dataclasses.fields(settings)}[name].default


def _serve_options() -> dict[str, Any]:
    """The click parameters of ``kvchat serve`` (typer's own click), by name."""
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {param.name: param for param in serve.params if param.name != "help"}


def test_every_option_is_classified() -> None:
    assert set(_serve_options()) == set(SETTINGS_OPTIONS) | OTHER_OPTIONS
    assert not set(SETTINGS_OPTIONS) & OTHER_OPTIONS


@pytest.mark.parametrize("option", sorted(SETTINGS_OPTIONS))
def test_a_settings_option_defaults_to_its_field(option: str) -> None:
    settings, field, convert = SETTINGS_OPTIONS[option]
    assert convert(_serve_options()[option].default) == _field_default(settings, field)


def test_serve_has_no_literal_default_for_a_settings_option() -> None:
    tree = ast.parse(Path(inspect.getfile(kvchat.cli.serve)).read_text())
    (function,) = (node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "serve")
    arguments = function.args.args[-len(function.args.defaults) :]
    defaults = {argument.arg: default for argument, default in zip(arguments, function.args.defaults, strict=True)}
    for option in SETTINGS_OPTIONS:
        default = defaults[option]
        # None stands for "not given" in the repeatable options (api_key, allowed_host, cors_origin)
        literal = isinstance(default, ast.Constant) and default.value is not None
        assert not literal, f"--{option.replace('_', '-')} restates a default: {ast.unparse(default)}"


def test_serve_without_options_runs_on_the_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("KVCHAT_")]:
        monkeypatch.delenv(name)
    calls: list[dict[str, Any]] = []
    runtime = Runtime(serve=lambda model, **kwargs: calls.append({"model": model, **kwargs}))
    result = CliRunner().invoke(app, ["serve"], obj=runtime)
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["model"] == DEFAULT_CHAT_MODEL
    assert call["settings"] == ServerSettings(model_name=DEFAULT_CHAT_MODEL)
    # --max-tokens bounds requests that set no max_tokens too (EngineSettings.open_max_tokens)
    assert call["engine_settings"] == EngineSettings(open_max_tokens=ServerSettings.max_tokens_limit)
    assert (call["host"], call["port"], call["log_level"], call["access_log"]) == ("127.0.0.1", 8000, "info", True)


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0"), (1000, "1000"), (1536, "1536"), (2048, "2K"), (4 << 20, "4M"), (4 << 30, "4G")]
)
def test_format_size_writes_what_parse_size_reads(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


def test_temperature_comes_from_the_option_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    runtime = Runtime(serve=lambda model, **kwargs: calls.append(kwargs))
    assert CliRunner().invoke(app, ["serve", "--temperature", "0"], obj=runtime).exit_code == 0
    monkeypatch.setenv("KVCHAT_TEMPERATURE", "0.3")
    assert CliRunner().invoke(app, ["serve"], obj=runtime).exit_code == 0
    refused = CliRunner().invoke(app, ["serve", "--temperature", "2.5"], obj=runtime)
    assert refused.exit_code == 2 and "temperature" in refused.output
    assert [call["settings"].temperature for call in calls] == [0.0, 0.3]
