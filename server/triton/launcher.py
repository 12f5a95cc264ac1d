"""Run the ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel.

The wheel ships a real Triton Inference Server (2.51) with its python backend and one backend
stub per Python version.  This module runs that binary directly on one of our model repositories:

- ``LD_LIBRARY_PATH`` gets the wheel's ``nvidia_pytriton.libs`` and the directory of the running
  interpreter's ``libpython3.X.so``, or the binary picks up the system's libpython and breaks;
- ``PATH`` gets the running interpreter's ``bin`` first, since the stub runs ``python3`` from
  ``PATH`` to find its packages (numpy, onnxruntime);
- a backend directory under ``state_dir`` holds ``python/`` with ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub for the running Python;
- the server listens on 127.0.0.1 only, on free ports, in its own process group; ``start()`` waits
  on ``/v2/health/ready`` and ``stop()`` sends SIGTERM, then SIGKILL;
- it dies with the process that started it (``PR_SET_PDEATHSIG``), and ``state_dir/tritonserver.json``
  records it, so a service started after a ``kill -9`` ends a stale Triton of the same state dir (and
  its stubs, verified by their command lines so a recycled pid is never hit) before starting;
- every python-backend shared-memory region of one launch carries a prefix unique to that launch
  (``--backend-config=python,shm-region-prefix-name=...``), so exactly those regions are removed when
  the server stops, crashes or is found stale, and no other process's regions are touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import filecmp
import importlib.util
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from server.triton.shared import SHM_DIR

logger = logging.getLogger(__name__)

__all__ = [
    "BundledTriton",
    "TritonLaunchConfig",
    "TritonStartError",
    "build_command",
    "find_free_ports",
    "prepare_backend_directory",
    "system_tritonserver",
    "tritonserver_binary",
    "tritonserver_env",
]

INSTALL_HINT = "install it with `pip install 'nvidia-pytriton==0.7.0'` (or `pip install -e '.[triton]'`)"
LOG_TAIL_LINES = 40
HOST = "127.0.0.1"
_POLL_INTERVAL_S = 0.1
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB_NAME = "triton_python_backend_stub"
_ERROR_LINE = re.compile(r"^(E\d{4} |error:|Error:)")
_MAX_ERROR_LINES = 10
_MAX_ERROR_LINE = 1000
_FAILED_START_GRACE_S = 1.0
_GROUP_KILL_WAIT_S = 5.0
# The python backend's regions are named <prefix><uuid>; ours get a prefix unique to one launch.
_SHM_PREFIX_STEM = "t2i_triton_"
# Regions younger than this are never taken for orphans (Triton makes one just before its stub).
_ORPHAN_REGION_MIN_AGE_S = 2.0
# Where a running server is recorded, so a later start can end it if its owner died.
PID_FILE = "tritonserver.json"
_PR_SET_PDEATHSIG = 1
# Local health checks must not go through an http_proxy from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TritonStartError(RuntimeError):
    """The bundled Triton could not be found, prepared or brought to readiness."""


@dataclass(frozen=True)
class TritonLaunchConfig:
    """How to launch the bundled ``tritonserver``.

    ``explicit_model_control`` passes ``--model-control-mode=explicit`` and one ``--load-model=NAME``
    per name in ``load_models`` (``--load-model=*`` when it is empty).  ``metrics`` opens the
    metrics endpoint on a free port.  ``extra_args`` are appended to the command line as given.
    """

    model_repository: Path
    state_dir: Path
    log_path: Path | None = None
    explicit_model_control: bool = False
    load_models: tuple[str, ...] = ()
    metrics: bool = False
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 15.0
    extra_args: tuple[str, ...] = ()
    # A fixed HTTP port (None: a free one), so a restarted server can come back where clients look.
    http_port: int | None = None
    # A tritonserver installed on the host (the Docker image's /opt/tritonserver/bin/tritonserver, with
    # its TensorRT, onnxruntime and python backends) run as it is: its own backend directory and
    # libraries. None: the nvidia-pytriton wheel's binary, prepared as described above.
    binary: Path | None = None
    # Added to tritonserver's environment (its python-backend models read their T2I_* settings there).
    environment: Mapping[str, str] = field(default_factory=dict)

    @property
    def resolved_log_path(self) -> Path:
        return self.log_path if self.log_path is not None else self.state_dir / "triton.log"


# --------------------------------------------------------------------------------------------------
# Locating the wheel's files
# --------------------------------------------------------------------------------------------------


def _pytriton_dir() -> Path:
    """The directory of the installed ``pytriton`` package (from ``nvidia-pytriton``)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError) as exc:  # a broken install
        raise TritonStartError(f"cannot locate the pytriton package ({exc}); {INSTALL_HINT}") from exc
    if spec is None:
        raise TritonStartError(f"the nvidia-pytriton package is not installed; {INSTALL_HINT}")
    if spec.origin is not None and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise TritonStartError(f"cannot locate the pytriton package directory; {INSTALL_HINT}")
    return Path(locations[0])


def system_tritonserver(setting: str = "") -> Path | None:
    """The host's ``tritonserver``: the ``TRITONSERVER`` setting when given (it must be an executable
    file), else ``tritonserver`` on ``PATH``, else None (use the wheel's)."""
    if setting:
        path = Path(setting)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise TritonStartError(f"TRITONSERVER={setting} is not an executable file")
        return path
    found = shutil.which("tritonserver")
    return Path(found) if found else None


def _tritonserver_dist_dir() -> Path:
    return _pytriton_dir() / "tritonserver"


def tritonserver_binary() -> Path:
    """Path of the ``tritonserver`` executable shipped in the ``nvidia-pytriton`` wheel."""
    binary = _tritonserver_dist_dir() / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonStartError(f"no tritonserver binary at {binary}; {INSTALL_HINT}")
    if not os.access(binary, os.X_OK):
        raise TritonStartError(f"{binary} is not executable; reinstall nvidia-pytriton")
    return binary


def _wheel_libs_dir() -> Path:
    """The wheel's bundled shared libraries (``site-packages/nvidia_pytriton.libs``)."""
    pytriton_dir = _pytriton_dir()
    candidates = (
        pytriton_dir.parent / "nvidia_pytriton.libs",  # a normal wheel install
        pytriton_dir / "tritonserver" / "external_libs",  # an editable install of pytriton
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise TritonStartError(f"no nvidia_pytriton.libs directory next to {pytriton_dir}; {INSTALL_HINT}")


def _stub_path() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = _tritonserver_dist_dir() / "python_backend_stubs"
    stub = stubs / version / _STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonStartError(
            f"the bundled python backend has no stub for Python {version} (has: {available}); "
            f"run with one of those Python versions"
        )
    return stub


# --------------------------------------------------------------------------------------------------
# Preparing the backend directory, environment, ports and command line
# --------------------------------------------------------------------------------------------------


def _copy_if_changed(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` atomically unless ``dst`` already has the same bytes.

    Returns whether a copy was made.
    """
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        if os.access(src, os.X_OK) and not os.access(dst, os.X_OK):
            dst.chmod(dst.stat().st_mode | 0o111)
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp_name)
        os.replace(tmp_name, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return True


def prepare_backend_directory(state_dir: Path) -> Path:
    """Build (or reuse) ``state_dir/backends`` for ``--backend-directory``.

    It holds ``python/`` with the wheel's ``libtriton_python.so`` and
    ``triton_python_backend_utils.py`` and the stub for the running Python copied as
    ``python/triton_python_backend_stub``.  Files already identical are left alone.
    """
    source_dir = _tritonserver_dist_dir() / "backends" / "python"
    backends = Path(state_dir) / "backends"
    target_dir = backends / "python"
    target_dir.mkdir(parents=True, exist_ok=True)
    copies: list[tuple[Path, Path]] = []
    for name in _PYTHON_BACKEND_FILES:
        src = source_dir / name
        if not src.is_file():
            raise TritonStartError(f"the bundled python backend lacks {src}; {INSTALL_HINT}")
        copies.append((src, target_dir / name))
    copies.append((_stub_path(), target_dir / _STUB_NAME))
    copied = [dst.name for src, dst in copies if _copy_if_changed(src, dst)]
    if copied:
        logger.debug("python backend files copied into %s: %s", target_dir, ", ".join(copied))
    return backends


def _prepend_path_list(value: str | None, *entries: str) -> str:
    parts = [e for e in entries if e]
    if value:
        parts.append(value)
    return os.pathsep.join(parts)


def tritonserver_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``tritonserver``: ``base`` (default ``os.environ``) plus library and
    executable search paths for the bundled libraries and the running interpreter."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = _prepend_path_list(
        env.get("LD_LIBRARY_PATH"), str(_wheel_libs_dir()), str(libdir) if libdir else ""
    )
    env["PATH"] = _prepend_path_list(env.get("PATH"), str(Path(sys.executable).parent))
    return env


def find_free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (each socket bound to port 0)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def build_command(
    config: TritonLaunchConfig,
    *,
    binary: Path,
    backend_directory: Path | None,
    http_port: int,
    grpc_port: int,
    metrics_port: int | None,
    shm_region_prefix: str | None = None,
) -> list[str]:
    """The ``tritonserver`` command line for ``config`` on the given ports (``backend_directory``
    None: the binary's own).

    ``shm_region_prefix`` names the python backend's shared-memory regions of this launch."""
    cmd = [str(binary), "--model-repository", str(config.model_repository)]
    if backend_directory is not None:
        cmd += ["--backend-directory", str(backend_directory)]
    cmd += [
        "--http-address",
        HOST,
        "--http-port",
        str(http_port),
        "--grpc-address",
        HOST,
        "--grpc-port",
        str(grpc_port),
    ]
    if config.metrics:
        if metrics_port is None:
            raise ValueError("metrics are enabled but no metrics port was given")
        cmd += ["--allow-metrics", "true", "--metrics-address", HOST, "--metrics-port", str(metrics_port)]
    else:
        cmd += ["--allow-metrics", "false"]
    if config.explicit_model_control:
        cmd.append("--model-control-mode=explicit")
        names = config.load_models or ("*",)
        cmd += [f"--load-model={name}" for name in names]
    elif config.load_models:
        raise ValueError("load_models is only used with explicit_model_control=True")
    cmd += ["--exit-timeout-secs", "5", "--log-verbose", "0"]
    if shm_region_prefix is not None:
        cmd.append(f"--backend-config=python,shm-region-prefix-name={shm_region_prefix}")
    cmd += list(config.extra_args)
    return cmd


def _read_log_since(path: Path, offset: int) -> list[str]:
    """The lines of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError as exc:
        return [f"<cannot read {path}: {exc}>"]
    return data.decode("utf-8", errors="replace").splitlines()


def _failure_report(path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    """The error lines (glog ``E....`` and ``error:``) and the last ``lines`` lines of one start."""
    log_lines = _read_log_since(path, offset)
    errors = [
        line if len(line) <= _MAX_ERROR_LINE else line[:_MAX_ERROR_LINE] + " ..."
        for line in log_lines
        if _ERROR_LINE.match(line)
    ][-_MAX_ERROR_LINES:]
    report = ""
    if errors:
        report += "error lines:\n" + "\n".join(errors) + "\n"
    report += f"last {lines} lines:\n" + "\n".join(log_lines[-lines:])
    return report


def _http_status(url: str, timeout_s: float) -> int | None:
    """HTTP status of a GET on ``url``, or None when nothing answers."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _cmdline(pid: int) -> list[str]:
    """The arguments of process ``pid`` (empty when it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode("utf-8", errors="replace") for arg in raw.split(b"\0")[:-1]]


def process_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (the state first, then the parent's
    pid...); ``OSError`` when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), to tell it from a recycled pid."""
    try:
        return int(process_stat(pid)[19])
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    try:
        return int(process_stat(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _is_server_of(pid: int, backend_directory: Path) -> bool:
    """Whether ``pid`` is a tritonserver started with ``--backend-directory backend_directory``."""
    args = _cmdline(pid)
    if not args or Path(args[0]).name != "tritonserver":
        return False
    return ("--backend-directory", str(backend_directory)) in itertools.pairwise(args)


def stub_processes(backend_directory: Path) -> dict[int, list[str]]:
    """The python-backend stubs run from ``backend_directory`` (any parent): their arguments by pid."""
    stub = str(backend_directory / "python" / _STUB_NAME)
    stubs = {}
    for pid in _pids():
        args = _cmdline(pid)
        if args and args[0] == stub:
            stubs[pid] = args
    return stubs


def stub_model(args: list[str]) -> str:
    """The model a stub serves, from its arguments (``<repository>/<model>/<version>/model.py``)."""
    return Path(args[1]).parent.parent.name


def remove_shm_regions(prefix: str, keep: Collection[str] = (), min_age_s: float = 0.0) -> list[Path]:
    """Unlink the /dev/shm regions named ``prefix*`` (one launch's), except ``keep``; returns them."""
    if not re.fullmatch(rf"{_SHM_PREFIX_STEM}[0-9a-f]+_", prefix):
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


def _die_with_parent(prctl: Callable[..., int], parent_pid: int) -> None:
    """In the child before exec: get SIGTERM when the parent goes (Triton then shuts down cleanly,
    stubs and shared memory included), and go now if the parent already went."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_verified(pids: list[int], what: str) -> None:
    """SIGKILL ``pids`` (already checked to be ours) and wait, bounded, until they are gone."""
    for pid in pids:
        logger.warning("ending %s (pid %d) left over from an earlier run", what, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _GROUP_KILL_WAIT_S
    while any(_cmdline(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_process_group(pgid: int, timeout_s: float) -> None:
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


# --------------------------------------------------------------------------------------------------
# The running server
# --------------------------------------------------------------------------------------------------


# The servers this process runs, by resolved state dir.
_RUNNING: dict[Path, BundledTriton] = {}


class BundledTriton:
    """One ``tritonserver`` process from the nvidia-pytriton wheel.

    ``start()`` launches it and waits until ``/v2/health/ready`` answers 200; ``stop()`` ends it.
    As a context manager it starts on enter and stops on exit.
    """

    def __init__(self, config: TritonLaunchConfig) -> None:
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._http_port: int | None = None
        self._grpc_port: int | None = None
        self._metrics_port: int | None = None
        self._shm_prefix: str | None = None

    # -- properties ----------------------------------------------------------------------------

    @property
    def config(self) -> TritonLaunchConfig:
        return self._config

    @property
    def log_path(self) -> Path:
        return self._config.resolved_log_path

    @property
    def http_port(self) -> int:
        if self._http_port is None:
            raise RuntimeError("the Triton server has not been started")
        return self._http_port

    @property
    def grpc_port(self) -> int:
        if self._grpc_port is None:
            raise RuntimeError("the Triton server has not been started")
        return self._grpc_port

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        if self._metrics_port is None:
            return None
        return f"http://{HOST}:{self._metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def shm_region_prefix(self) -> str | None:
        """The prefix of every python-backend shared-memory region of the current launch."""
        return self._shm_prefix

    @property
    def backend_directory(self) -> Path:
        return Path(self._config.state_dir) / "backends"

    @property
    def pid_file(self) -> Path:
        return Path(self._config.state_dir) / PID_FILE

    def model_stubs(self) -> dict[str, int]:
        """Live python-backend stub processes of this server per model name (a stub that was killed
        is gone from here while Triton still calls its model ready)."""
        counts: dict[str, int] = {}
        for args in self._own_stubs().values():
            model = stub_model(args)
            counts[model] = counts.get(model, 0) + 1
        return counts

    def _own_stubs(self) -> dict[int, list[str]]:
        """The python-backend stubs this server started, by pid (found by parent, whatever backend
        directory the binary was given: the wheel's prepared one or a system tritonserver's own)."""
        if self._process is None or not self.is_running():
            return {}
        stubs = {}
        for pid in _pids():
            args = _cmdline(pid)
            if len(args) > 1 and Path(args[0]).name == _STUB_NAME and _parent(pid) == self._process.pid:
                stubs[pid] = args
        return stubs

    def remove_orphaned_regions(self) -> list[Path]:
        """Unlink this launch's shared-memory regions whose stub is gone (a stub that was killed:
        Triton keeps the region, mapped, after the model is loaded again).  A region is in use while
        a live stub of this server names it on its command line; a region younger than a second is
        left alone (Triton creates it just before it starts the stub)."""
        if self._shm_prefix is None or self._process is None or not self.is_running():
            return []
        in_use = {args[2] for args in self._own_stubs().values() if len(args) > 2}
        return remove_shm_regions(self._shm_prefix, keep=in_use, min_age_s=_ORPHAN_REGION_MIN_AGE_S)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Launch ``tritonserver`` and wait until it reports ready.

        Raises TritonStartError (with the end of the log) if it exits or is not ready in time.
        """
        if self.is_running():
            raise RuntimeError(f"the Triton server is already running (pid {self.pid})")
        self._reap()
        config = self._config
        repository = Path(config.model_repository)
        if not repository.is_dir():
            raise TritonStartError(f"the model repository {repository} is not a directory")

        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._end_stale_server()
        backend_directory: Path | None = None
        if config.binary is not None:
            binary, env = config.binary, dict(os.environ)
        else:
            binary = tritonserver_binary()
            backend_directory = prepare_backend_directory(state_dir)
            env = tritonserver_env()
        env.update(config.environment)
        shm_prefix = f"{_SHM_PREFIX_STEM}{secrets.token_hex(6)}_"
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, called after it
        parent_pid = os.getpid()

        ports = find_free_ports(3 if config.metrics else 2)
        http_port, grpc_port = config.http_port or ports[0], ports[1]
        metrics_port = ports[2] if config.metrics else None
        cmd = build_command(
            config,
            binary=binary,
            backend_directory=backend_directory,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            shm_region_prefix=shm_prefix,
        )

        log_path = self.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command_line = shlex.join(cmd)
        with log_path.open("ab") as log_file:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log_file.write(f"\n===== tritonserver start {stamp}: {command_line}\n".encode())
            log_file.flush()
            log_offset = log_file.tell()
            logger.info("starting tritonserver: %s", command_line)
            logger.info(
                "tritonserver ports: http %d, grpc %d, metrics %s; log %s",
                http_port,
                grpc_port,
                metrics_port if metrics_port is not None else "off",
                log_path,
            )
            started_at = time.monotonic()
            try:
                process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=state_dir,
                    start_new_session=True,
                    # SIGTERM when the thread that started it ends: the service's process, or the
                    # long-lived worker thread it starts Triton from.
                    preexec_fn=lambda: _die_with_parent(prctl, parent_pid),
                )
            except OSError as exc:
                raise TritonStartError(f"cannot run {binary}: {exc} (log: {log_path})") from exc
        logger.info("tritonserver started, pid %d", process.pid)
        self._process = process
        self._shm_prefix = shm_prefix
        _RUNNING[state_dir.resolve()] = self
        self._write_pid_file(process.pid, shm_prefix)
        self._http_port, self._grpc_port, self._metrics_port = http_port, grpc_port, metrics_port

        try:
            self._wait_ready(started_at, log_offset)
        except BaseException:
            self._terminate(grace_s=_FAILED_START_GRACE_S)
            raise
        logger.info(
            "tritonserver ready at %s (grpc %s) after %.1f s (pid %d)",
            self.http_url,
            self.grpc_url,
            time.monotonic() - started_at,
            process.pid,
        )

    def _wait_ready(self, started_at: float, log_offset: int) -> None:
        process = self._process
        assert process is not None
        ready_url = f"{self.http_url}/v2/health/ready"
        deadline = started_at + self._config.startup_timeout_s
        while True:
            returncode = process.poll()
            if returncode is not None:
                self._raise_start_error(
                    f"tritonserver exited with code {returncode} before it was ready", log_offset
                )
            if _http_status(ready_url, timeout_s=1.0) == 200:
                return
            if time.monotonic() >= deadline:
                self._raise_start_error(
                    f"tritonserver was not ready after {self._config.startup_timeout_s:g} s", log_offset
                )
            time.sleep(_POLL_INTERVAL_S)

    def _raise_start_error(self, reason: str, log_offset: int) -> NoReturn:
        # Let the process finish writing (it may be exiting) before reading the log.
        if self._process is not None and self._process.poll() is None:
            self._terminate(grace_s=_FAILED_START_GRACE_S)
        message = f"{reason}; log {self.log_path}\n{_failure_report(self.log_path, log_offset)}"
        logger.error("%s", message)
        raise TritonStartError(message)

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait ``stop_timeout_s``, then SIGKILL.  Idempotent."""
        if self._process is None:
            return
        pid = self._process.pid
        self._terminate(grace_s=self._config.stop_timeout_s)
        logger.info("tritonserver (pid %d) stopped", pid)

    def _terminate(self, grace_s: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "tritonserver (pid %d) did not exit %.0f s after SIGTERM; killing it",
                    process.pid,
                    grace_s,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Leftover members of its process group (python backend stubs) go too.
        _kill_process_group(process.pid, timeout_s=_GROUP_KILL_WAIT_S)
        # Stubs that left the group (none known) are still ours by their stub path.
        _kill_verified(list(stub_processes(self.backend_directory)), "a python backend stub")
        self._process = None
        _RUNNING.pop(Path(self._config.state_dir).resolve(), None)
        if self._shm_prefix is not None:
            remove_shm_regions(self._shm_prefix)
            self._shm_prefix = None
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def _write_pid_file(self, pid: int, shm_prefix: str) -> None:
        record = {
            "pid": pid,
            "owner_pid": os.getpid(),
            "owner_start_time": _start_time(os.getpid()),
            "shm_region_prefix": shm_prefix,
        }
        tmp = self.pid_file.with_name(f".{PID_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.pid_file)

    def _end_stale_server(self) -> None:
        """End what an earlier run on this state dir left behind (its owner was killed): the server
        recorded in the pid file, any stub run from this state dir, and that launch's shm regions.

        A server whose owner is still alive is not stale: starting beside it is an error.
        """
        state_dir = Path(self._config.state_dir).resolve()
        other = _RUNNING.get(state_dir)
        if other is not None and other is not self and other.is_running():
            raise TritonStartError(f"a Triton server of this process already runs on state dir {state_dir}")
        try:
            record = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            record = {}
        owner = record.get("owner_pid")
        if (
            isinstance(owner, int)
            and owner != os.getpid()
            and _start_time(owner) is not None
            and _start_time(owner) == record.get("owner_start_time")
        ):
            raise TritonStartError(
                f"state dir {state_dir} is in use by process {owner}, which runs a Triton server there; "
                "give each service its own STATE_DIR"
            )
        backend_directory = self.backend_directory
        pid = record.get("pid")
        if isinstance(pid, int) and _is_server_of(pid, backend_directory):
            _kill_verified([pid], "tritonserver")
        _kill_verified(list(stub_processes(backend_directory)), "a python backend stub")
        prefix = record.get("shm_region_prefix")
        if isinstance(prefix, str) and re.fullmatch(rf"{_SHM_PREFIX_STEM}[0-9a-f]+_", prefix):
            remove_shm_regions(prefix)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def _reap(self) -> None:
        if self._process is not None:
            self._terminate(grace_s=0.0)

    def __enter__(self) -> BundledTriton:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid {self.pid} at {self.http_url}" if self.is_running() else "stopped"
        return f"BundledTriton({self._config.model_repository}, {state})"
