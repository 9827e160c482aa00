"""`Runtime`: what the commands start (the server, a Ray application, an engine).

A command takes its runtime from the click context's `obj`, so a test can run
the real command line with stand-ins::

    CliRunner().invoke(app, ["serve", "--port", "9000"], obj=Runtime(serve=record))

Without one it uses :data:`SYSTEM`, the real functions, imported only when a
command runs (``kvchat --help`` stays fast).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from kvchat.engine import Engine, EngineSettings


def _serve(model: str, **options: Any) -> None:
    from kvchat.server import serve

    serve(model, **options)


def _build_ray_app(model: str, **options: Any) -> Any:
    from kvchat.server.ray_serve.app import build_app

    return build_app(model, **options)


def _run_ray(application: Any, **options: Any) -> None:
    from kvchat.server.ray_serve.app import run

    run(application, **options)


def _open_engine(model: str | Path, settings: EngineSettings) -> AbstractContextManager[Engine]:
    from kvchat.engine import Engine

    return Engine(model, settings)


def _resolve_model(name: str) -> str | Path:
    from kvchat.models import resolve

    return resolve(name)


@dataclass(frozen=True)
class Runtime:
    """What the commands run; each default is the real one.

    `serve(model, **options)`: :func:`kvchat.server.serve` (``kvchat serve``);
    `build_ray_app(model, **options)` and `run_ray(application, **options)`:
    ``build_app`` and ``run`` of :mod:`kvchat.server.ray_serve.app` (``kvchat
    serve --ray``); `open_engine(model_path, settings)`: an
    :class:`~kvchat.engine.Engine` to use in a ``with`` block, and
    `resolve_model(name)`: :func:`kvchat.models.resolve` (``kvchat chat``).
    """

    serve: Callable[..., None] = _serve
    build_ray_app: Callable[..., Any] = _build_ray_app
    run_ray: Callable[..., None] = _run_ray
    open_engine: Callable[[str | Path, EngineSettings], AbstractContextManager[Engine]] = _open_engine
    resolve_model: Callable[[str], str | Path] = _resolve_model


SYSTEM = Runtime()
"""The real runtime."""


def runtime_of(ctx: typer.Context) -> Runtime:
    """The runtime a command runs with: the context's `obj` if it is a :class:`Runtime`, else :data:`SYSTEM`."""
    return ctx.obj if isinstance(ctx.obj, Runtime) else SYSTEM
