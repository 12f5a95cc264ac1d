"""A request's constant inputs in a system shared-memory region that Triton reads in place.

A request's text embeddings are the same at each of its UNet steps.  Sent inline, Triton reads them
off the socket at every step, which costs SD 1.5's and SDXL's guided calls a good share of their
exchange (bench/RESULTS.md, the ``bench/transport.py`` figures).  When Triton runs on this host and
shares its ``/dev/shm``, :class:`Region` holds them for the request and each call names the region
(:class:`SharedArray`) instead of carrying the bytes.  The region's file is created with its pages
allocated (a full ``/dev/shm`` is an error here, not a SIGBUS on the first write), only while half
of ``/dev/shm`` stays free (the python backend's stubs live there too), and readable by this user
only; it is unlinked when the request ends, and a crashed process's regions are removed by the next
start (:func:`remove_stale_regions`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

SHM_DIR: Final = Path("/dev/shm")
STEM: Final = "t2i_inputs_"  # then the owning process's pid, "_", a random token
_ALIGN: Final = 64
_KEEP_FREE: Final = 0.5  # of /dev/shm, for the python backend


@dataclass(frozen=True)
class SharedArray:
    """Rows of an array in a registered region: what an inference request names instead of its bytes."""

    region: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, rows: slice) -> SharedArray:
        """Rows ``start:stop`` (as a batch is cut into chunks of the model's batch size)."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("only contiguous rows of a shared array can be taken")
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        return SharedArray(
            self.region, self.offset + start * row_bytes, (max(stop - start, 0), *self.shape[1:]), self.dtype
        )


class Region:
    """A ``/dev/shm`` file of this process holding copies of ``arrays``; :meth:`close` unlinks it."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.name = f"{STEM}{os.getpid()}_{secrets.token_hex(8)}"
        offsets, size = {}, 0
        for key, array in arrays.items():
            offsets[key] = size
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        self.size = max(size, _ALIGN)
        _check_room(self.size)
        path = SHM_DIR / self.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
            self._map = mmap.mmap(fd, self.size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        for key, array in arrays.items():
            view: np.ndarray = np.ndarray(array.shape, array.dtype, buffer=self._map, offset=offsets[key])
            view[...] = array
            del view  # no view may outlive the map (close would refuse)
        self.arrays = {
            key: SharedArray(self.name, offsets[key], tuple(a.shape), np.dtype(a.dtype))
            for key, a in arrays.items()
        }

    def close(self) -> None:
        self._map.close()
        (SHM_DIR / self.name).unlink(missing_ok=True)


def _check_room(size: int) -> None:
    """A region may not leave less than half of ``/dev/shm`` free: the python backend's stubs need it
    too (a container's is 64 MiB unless set larger)."""
    fs = os.statvfs(SHM_DIR)
    total, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
    if free - size < total * _KEEP_FREE:
        raise OSError(errno.ENOSPC, f"a {size}-byte region would leave less than half of {SHM_DIR} free")


def remove_stale_regions() -> list[Path]:
    """Unlink the regions of processes that are gone (a crash skipped their ``close``)."""
    removed = []
    with contextlib.suppress(OSError):
        for path in SHM_DIR.glob(f"{STEM}*"):
            pid = path.name.removeprefix(STEM).partition("_")[0]
            if pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
