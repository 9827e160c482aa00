"""One-time initialisation of llama.cpp and the bridge from its log to `logging`.

llama.cpp prints its own diagnostics to stderr unless a callback is set. kvchat
routes them to the ``kvchat.llama.cpp`` logger instead: warnings and errors are
kept, the chatty info and debug lines are logged at DEBUG.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import llama_cpp

logger = logging.getLogger("kvchat.llama.cpp")

# ggml_log_level (ggml.h): 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continue previous line.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}

_init_lock = threading.Lock()
_initialised = False
_partial_line: list[str] = []
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp sends lines in pieces; join them so each record is one line.
    global _last_level
    if level != 5:
        _last_level = _LEVELS.get(level, logging.DEBUG)
    _partial_line.append(text.decode("utf-8", errors="replace"))
    if _partial_line[-1].endswith("\n"):
        line = "".join(_partial_line).rstrip("\n")
        _partial_line.clear()
        if line and logger.isEnabledFor(_last_level):
            logger.log(_last_level, "%s", line)


def ensure_backend() -> None:
    """Initialise the llama.cpp backend once per process and install the log bridge."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True
