"""The bundled Triton's lifecycle: one ``tritonserver`` process started, watched and stopped.

- the server runs in its own process group; ``start()`` waits on ``/v2/health/ready`` and ``stop()``
  sends SIGTERM, then SIGKILL, then ends what is left of its group and its stubs;
- it dies with the process that started it (``PR_SET_PDEATHSIG``), and ``state_dir/tritonserver.json``
  records it, so a service started after a ``kill -9`` ends a stale Triton of the same state dir (and
  its stubs, verified by their command lines so a recycled pid is never hit) before starting;
- each launch's python-backend shared-memory regions carry a prefix of their own, removed when the
  server stops, crashes or is found stale (:mod:`server.triton.launcher.processes`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import psutil

from server.triton.launcher import processes
from server.triton.launcher.binary import (
    HOST,
    TritonLaunchConfig,
    TritonStartError,
    build_command,
    find_free_ports,
    prepare_backend_directory,
    tritonserver_binary,
    tritonserver_env,
)
from server.triton.launcher.processes import SHM_PREFIX, SHM_PREFIX_STEM, remove_shm_regions, stub_model

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
# Where a running server is recorded, so a later start can end it if its owner died.
PID_FILE = "tritonserver.json"
_POLL_INTERVAL_S = 0.1
_ERROR_LINE = re.compile(r"^(E\d{4} |error:|Error:)")
_MAX_ERROR_LINES = 10
_MAX_ERROR_LINE = 1000
_FAILED_START_GRACE_S = 1.0
# Regions younger than this are never taken for orphans (Triton makes one just before its stub).
_ORPHAN_REGION_MIN_AGE_S = 2.0
# Local health checks must not go through an http_proxy from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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

    def stub_memory(self, models: Collection[str]) -> int:
        """Resident memory (RSS, bytes) of the python-backend stubs that serve ``models``."""
        total = 0
        for pid, args in self._own_stubs().items():
            if stub_model(args) in models:
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(pid).memory_info().rss
        return total

    def _own_stubs(self) -> dict[int, list[str]]:
        """The python-backend stubs this server started, by pid (found by parent, whatever backend
        directory the binary was given: the wheel's prepared one or a system tritonserver's own)."""
        if self._process is None or not self.is_running():
            return {}
        return processes.child_stubs(self._process.pid)

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
        shm_prefix = f"{SHM_PREFIX_STEM}{secrets.token_hex(6)}_"
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
                    preexec_fn=lambda: processes.die_with_parent(prctl, parent_pid),
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
        processes.kill_process_group(process.pid, timeout_s=processes.GROUP_KILL_WAIT_S)
        # Stubs that left the group (none known) are still ours by their stub path.
        processes.kill_stubs_run_from(self.backend_directory)
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
            "owner_start_time": processes.start_time(os.getpid()),
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
            and processes.start_time(owner) is not None
            and processes.start_time(owner) == record.get("owner_start_time")
        ):
            raise TritonStartError(
                f"state dir {state_dir} is in use by process {owner}, which runs a Triton server there; "
                "give each service its own STATE_DIR"
            )
        backend_directory = self.backend_directory
        pid = record.get("pid")
        server = processes.process(pid) if isinstance(pid, int) else None
        if server is not None and processes.is_server_of(server, backend_directory):
            processes.kill_verified([server], "tritonserver")
        processes.kill_stubs_run_from(backend_directory)
        prefix = record.get("shm_region_prefix")
        if isinstance(prefix, str) and SHM_PREFIX.fullmatch(prefix):
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
