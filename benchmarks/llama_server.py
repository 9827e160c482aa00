"""llama.cpp's own `llama-server`, built from the llama.cpp that kvchat runs on.

kvchat runs on the llama.cpp that llama-cpp-python vendors; the peer is built from
that same source: the llama-cpp-python sdist of the installed version is downloaded,
unpacked, and its `vendor/llama.cpp` built with CMake (target `llama-server`; web UI,
curl, tests and examples off; compiled without AMX kernels, as kvchat's own
llama.cpp is). The build goes to a cache directory outside the
repository (`~/.cache/kvchat/llama-server/<version>`, or `$KVCHAT_PEER_CACHE`) on
first use, about 10 minutes on 2 cores; never in `make test` or `.ci/run`.

    python benchmarks/llama_server.py      # build if needed; print the binary's path and version
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
"""Compiler flags of every llama.cpp build of the benchmarks' peers, as kvchat's own
(the Makefile's LLAMA_CFLAGS): on Intel Xeons with AMX, llama.cpp's AMX kernels crash
the process (a peer built with them died after its first request on such a machine)."""

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
)


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python's version: the source the peer is built from."""
    return importlib.metadata.version("llama-cpp-python")


def cache_dir(version: str) -> Path:
    """Where the build of `version` lives."""
    root = Path(os.environ.get("KVCHAT_PEER_CACHE", Path.home() / ".cache" / "kvchat" / "llama-server"))
    return root / version


def llama_server_binary(version: str | None = None) -> Path:
    """The path of `llama-server` built from llama-cpp-python `version`'s vendored
    llama.cpp (default: the installed version), building it on first use."""
    version = version or llama_cpp_python_version()
    home = cache_dir(version)
    binary = home / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    source = home / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        _unpack_vendored_source(version, source)
    print(f"building llama-server from {source} (about 10 minutes on 2 cores)", flush=True)
    build = home / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
    if not binary.exists():
        raise RuntimeError(f"the build finished without {binary}")
    return binary


def _unpack_vendored_source(version: str, target: Path) -> None:
    """Download llama-cpp-python `version`'s sdist and move its vendor/llama.cpp to `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the llama-cpp-python {version} sdist", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, f"llama-cpp-python=={version}"],
            check=True,
        )
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as sdist:
            sdist.extractall(tmp, filter="data")
        (vendored,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(vendored), target)


def version_line(binary: Path) -> str:
    """What `llama-server --version` prints (its llama.cpp build number and commit)."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "unknown"


if __name__ == "__main__":
    path = llama_server_binary()
    print(path)
    print(version_line(path))
