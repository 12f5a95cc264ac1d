"""Facts about tritonserver's processes and the cleanup of what one launch leaves: its python-backend
stubs, its process group and its shared-memory regions.

Processes are read through psutil, whose ``Process`` carries the process's start time: a signal goes
only to the process that was checked, never to a later one that got its recycled pid.  Every process
killed here was first verified by its command line (a ``tritonserver`` given this state dir's backend
directory, or a stub run from it) or is a member of tritonserver's own process group.

Every python-backend shared-memory region of one launch carries a prefix unique to that launch
(``--backend-config=python,shm-region-prefix-name=...``), so exactly those regions are removed when
the server stops, crashes or is found stale, and no other process's regions are touched.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import psutil

from server.triton.launcher.binary import STUB_NAME
from server.triton.shared import SHM_DIR

logger = logging.getLogger(__name__)

GROUP_KILL_WAIT_S = 5.0
# The python backend's regions are named <prefix><uuid>; ours get a prefix unique to one launch.
SHM_PREFIX_STEM = "t2i_triton_"
SHM_PREFIX = re.compile(rf"{SHM_PREFIX_STEM}[0-9a-f]+_")
_PR_SET_PDEATHSIG = 1


def process_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (the state first, then the parent's
    pid...); ``OSError`` when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process(pid: int) -> psutil.Process | None:
    """Process ``pid``, or None when there is none."""
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, to tell it from a later process with its recycled pid: clock
    ticks since boot, exact and the same in every process (psutil's ``create_time`` is wall-clock
    seconds, which move when the clock is set)."""
    try:
        return int(process_stat(pid)[19])
    except OSError:
        return None


def _arguments(proc: psutil.Process) -> list[str]:
    """The arguments of ``proc`` (empty when it is gone or a zombie)."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def is_server_of(proc: psutil.Process, backend_directory: Path) -> bool:
    """Whether ``proc`` is a tritonserver started with ``--backend-directory backend_directory``."""
    args = _arguments(proc)
    if not args or Path(args[0]).name != "tritonserver":
        return False
    return ("--backend-directory", str(backend_directory)) in itertools.pairwise(args)


def child_stubs(parent: int) -> dict[int, list[str]]:
    """The python-backend stubs process ``parent`` started: their arguments by pid (found by parent,
    whatever backend directory it was given)."""
    try:
        children = psutil.Process(parent).children()
    except psutil.Error:
        return {}
    stubs = {child.pid: _arguments(child) for child in children}
    return {pid: args for pid, args in stubs.items() if is_stub(args)}


def is_stub(args: list[str]) -> bool:
    """Whether ``args`` are a python-backend stub's (``<stub> <model.py> <shm region> ...``)."""
    return len(args) > 1 and Path(args[0]).name == STUB_NAME


def _stubs_run_from(backend_directory: Path) -> dict[psutil.Process, list[str]]:
    stub = str(backend_directory / "python" / STUB_NAME)
    return {
        proc: proc.info["cmdline"]
        for proc in psutil.process_iter(["cmdline"])
        if proc.info["cmdline"] and proc.info["cmdline"][0] == stub
    }


def stub_processes(backend_directory: Path) -> dict[int, list[str]]:
    """The python-backend stubs run from ``backend_directory`` (any parent): their arguments by pid."""
    return {proc.pid: args for proc, args in _stubs_run_from(backend_directory).items()}


def stub_model(args: list[str]) -> str:
    """The model a stub serves, from its arguments (``<repository>/<model>/<version>/model.py``)."""
    return Path(args[1]).parent.parent.name


def kill_stubs_run_from(backend_directory: Path) -> None:
    """SIGKILL every python-backend stub run from ``backend_directory``, whatever its parent."""
    kill_verified(list(_stubs_run_from(backend_directory)), "a python backend stub")


def kill_verified(procs: Iterable[psutil.Process], what: str) -> None:
    """SIGKILL ``procs`` (already checked to be ours) and wait, bounded, until they are gone."""
    procs = list(procs)
    for proc in procs:
        logger.warning("ending %s (pid %d) left over from an earlier run", what, proc.pid)
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil refuses a pid that now names another process
    deadline = time.monotonic() + GROUP_KILL_WAIT_S
    while any(_arguments(proc) for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_process_group(pgid: int, timeout_s: float) -> None:
    """SIGKILL whatever is left in process group ``pgid`` and wait (bounded) until it is gone."""
    if not _process_group_alive(pgid):
        return
    logger.debug("killing leftover processes in tritonserver's process group %d", pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while _process_group_alive(pgid):
        if time.monotonic() >= deadline:
            logger.warning("processes of tritonserver's process group %d are still present", pgid)
            return
        time.sleep(0.02)


def die_with_parent(prctl: Callable[..., int], parent_pid: int) -> None:
    """In the child before exec: get SIGTERM when the parent goes (Triton then shuts down cleanly,
    stubs and shared memory included), and go now if the parent already went."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_shm_regions(prefix: str, keep: Collection[str] = (), min_age_s: float = 0.0) -> list[Path]:
    """Unlink the /dev/shm regions named ``prefix*`` (one launch's), except ``keep``; returns them."""
    if not SHM_PREFIX.fullmatch(prefix):
        raise ValueError(f"not a prefix of this launcher's regions: {prefix!r}")
    removed = []
    now = time.time()
    for region in sorted(SHM_DIR.glob(f"{prefix}*")):
        try:
            if region.name in keep or now - region.stat().st_mtime < min_age_s:
                continue
            region.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot remove leftover shared memory %s: %s", region, exc)
            continue
        logger.info("removed leftover shared memory %s", region)
        removed.append(region)
    return removed
