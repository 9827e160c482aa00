"""The stored-state tiers are bounded by default (no model needed)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kvchat.cli import app
from kvchat.cli.runtime import Runtime
from kvchat.engine import EngineSettings
from kvchat.errors import InvalidRequestError


def test_the_disk_tier_has_a_default_bound() -> None:
    assert EngineSettings().cache_disk_bytes == 4 << 30
    assert EngineSettings(cache_disk_bytes=None).cache_disk_bytes is None  # unbounded only when asked for
    for bad in (-1, 1.5, "4G"):
        with pytest.raises(InvalidRequestError):
            EngineSettings(cache_disk_bytes=bad)  # type: ignore[arg-type]


def test_serve_bounds_the_disk_tier_by_default(tmp_path) -> None:
    seen = []
    runtime = Runtime(serve=lambda model, **options: seen.append(options["engine_settings"]))
    runner = CliRunner()
    assert runner.invoke(app, ["serve", "--cache-dir", str(tmp_path)], obj=runtime).exit_code == 0
    assert runner.invoke(app, ["serve", "--cache-dir", str(tmp_path), "--cache-disk", "1G"], obj=runtime).exit_code == 0
    assert [s.cache_disk_bytes for s in seen] == [4 << 30, 1 << 30]
