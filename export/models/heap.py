"""The process's C heap (glibc malloc): the one place this project calls ``mallopt`` and ``malloc_trim``.

Three processes tune it, each for its own load:

- the service (:func:`limit_arenas`, :func:`return_free_memory`): glibc gives threads that contend for
  the heap arenas of their own (up to 8 per core) and keeps each arena's freed blocks; the service
  allocates large buffers on many threads (LoRA variant builds, tokenizing, PNG encoding in
  ``asyncio.to_thread`` workers), so freed memory scattered over many arenas made its RSS creep while
  the memory in use stayed flat (bench/RESULTS.md, the variant soak). Two arenas keep it flat.
- the exporter (:func:`release_memory`): one component's weights are handed back before the next one
  loads, with the mmap threshold fixed so large weight copies are unmapped when freed.
- the python-onnx Triton model (:class:`FreedMemory`): freed memory is kept between batches and handed
  back once the model idles.

Every function is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# The exporter's fixed mmap threshold (see release_memory).
EXPORT_MMAP_THRESHOLD_BYTES = 64 * 1024
# The heap's free top is given back by malloc itself only beyond this much (int's largest): the rest
# is FreedMemory's release.
KEPT_TRIM_THRESHOLD = (1 << 31) - 1


@cache
def glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas from now on (``MALLOC_ARENA_MAX``); True if glibc took it."""
    libc = glibc()
    if libc is None:
        return False
    taken = bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    if not taken:
        logger.warning("the C library refused MALLOC_ARENA_MAX=%d", arenas)
    return taken


def return_free_memory() -> None:
    """Give memory freed by big work (a variant build) back to the system now."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise), so
    one component's weights are gone before the next is loaded.

    It also fixes glibc's mmap threshold at 64 KiB: glibc raises it (up to 32 MiB) each time a mapped
    block is freed, after which the float32 weight copies of the next onnxruntime check run come from
    the heap, which keeps their pages; with the threshold fixed each copy goes back when freed
    (bench/RESULTS.md, the real-size export section)."""
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, EXPORT_MMAP_THRESHOLD_BYTES)
        libc.malloc_trim(0)


class FreedMemory:
    """Keeps the memory a batch freed for the next batch, and gives it back once the model idles.

    With onnxruntime's arena off, each run mallocs its intermediate tensors.  glibc mmaps large
    blocks and unmaps them at free, and trims the heap's free top, so every run faulted its pages
    in again (a large share of a tiny-UNet step: bench/RESULTS.md, the overhead section).  Here
    malloc never mmaps (every block comes from the heap, and a free keeps it) and trims nothing below
    2 GiB; a thread hands the freed memory back with ``malloc_trim`` once no batch has run for
    ``release_s`` seconds (0: after every batch).
    """

    def __init__(self, release_s: float) -> None:
        self.release_s = release_s
        self._ran = threading.Event()
        libc = glibc()
        kept = (
            libc is not None
            and libc.mallopt(M_MMAP_MAX, 0)
            and libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
        )
        self._libc = libc if kept else None
        if self._libc is not None and release_s > 0:
            threading.Thread(target=self._release_when_idle, name="t2i-free-memory", daemon=True).start()

    def batch_done(self) -> None:
        if self._libc is None:
            return
        if self.release_s > 0:
            self._ran.set()
        else:
            self._libc.malloc_trim(0)

    def _release_when_idle(self) -> None:
        libc = self._libc
        assert libc is not None
        while True:
            self._ran.wait()
            self._ran.clear()
            while self._ran.wait(self.release_s):  # another batch ran: wait again
                self._ran.clear()
            libc.malloc_trim(0)
