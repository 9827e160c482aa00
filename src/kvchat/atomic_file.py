"""`write_atomically`: a file appears whole or not at all, and stays after a crash."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Protocol

TEMP_SUFFIX = ".tmp"


class FileWriter(Protocol):
    """Writes a whole file from `parts`, as :func:`write_atomically` does (which is
    the default wherever one is taken)."""

    def __call__(self, path: str | os.PathLike[str], *parts: bytes) -> None: ...


def write_atomically(
    path: str | os.PathLike[str],
    *parts: bytes,
    fsync: Callable[[int], None] = os.fsync,
    replace: Callable[[str, Path], None] = os.replace,
) -> None:
    """Write `parts` one after another to a temporary file beside `path`
    (``.<name>.<random>.tmp``), flush it to disk, rename it over `path`, then
    flush the directory so that the rename survives a power loss (POSIX).

    A crash leaves the old file (or none), never half a file; on any error the
    temporary file is removed and the error raised. `fsync` (of the file, then
    of the directory) and `replace` (the rename) are the system calls, or
    stand-ins that fail or stop there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            for part in parts:
                file.write(part)
            file.flush()
            fsync(file.fileno())
        replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent, fsync)


def leftover_temp_files(directory: Path, name_suffix: str) -> list[Path]:
    """Temporary files that :func:`write_atomically` left in `directory` when the
    process died mid-write, for final names ending in `name_suffix`."""
    return sorted(directory.glob(f".*{name_suffix}.*{TEMP_SUFFIX}"))


def _fsync_directory(directory: Path, fsync: Callable[[int], None]) -> None:
    with suppress(OSError):  # some file systems cannot open or sync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            fsync(fd)
        finally:
            os.close(fd)
