"""The service process's C heap (glibc): few malloc arenas, and freed memory handed back.

glibc gives threads that contend for the heap arenas of their own (up to 8 per core) and keeps each
arena's freed blocks. The service allocates large buffers on many threads (LoRA variant builds,
tokenizing, PNG encoding in ``asyncio.to_thread`` workers), so freed memory scattered over many
arenas made its RSS creep: 503 -> 596 MB over 200 distinct LoRA sets on the mid model while the
memory in use stayed at 153 MB (bench/RESULTS.md). Two arenas keep it flat. Both calls are no-ops
where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas from now on (``MALLOC_ARENA_MAX``); True if glibc took it."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    taken = bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    if not taken:
        logger.warning("the C library refused MALLOC_ARENA_MAX=%d", arenas)
    return taken


def return_free_memory() -> None:
    """Give memory freed by big work (a variant build) back to the system now."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
