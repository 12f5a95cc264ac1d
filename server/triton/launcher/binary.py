"""The ``tritonserver`` binary: where it comes from, its environment, its backend directory and its
command line (ARCHITECTURE.md section 6).

The ``nvidia-pytriton`` wheel ships a real Triton Inference Server (2.51) with its python backend and
one backend stub per Python version; a host may instead have its own ``tritonserver`` (the Docker
image's), which is run as it is.  The wheel's binary needs:

- ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` and the directory of the running
  interpreter's ``libpython3.X.so``, or the binary picks up the system's libpython and breaks;
- ``PATH`` with the running interpreter's ``bin`` first, since the stub runs ``python3`` from
  ``PATH`` to find its packages (numpy, onnxruntime);
- a backend directory under ``state_dir`` holding ``python/`` with ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub for the running Python.

Either binary listens on 127.0.0.1 only, on the ports :func:`build_command` is given.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import logging
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = "install it with `pip install 'nvidia-pytriton==0.7.0'` (or `pip install -e '.[triton]'`)"
HOST = "127.0.0.1"
STUB_NAME = "triton_python_backend_stub"
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


class TritonStartError(RuntimeError):
    """The bundled Triton could not be found, prepared or brought to readiness."""


@dataclass(frozen=True)
class TritonLaunchConfig:
    """How to launch the bundled ``tritonserver``.

    ``explicit_model_control`` passes ``--model-control-mode=explicit`` and one ``--load-model=NAME``
    per name in ``load_models`` (``--load-model=*`` when it is empty and ``load_all``: without it,
    nothing loads at start).  ``metrics`` opens the
    metrics endpoint on a free port.  ``extra_args`` are appended to the command line as given.
    """

    model_repository: Path
    state_dir: Path
    log_path: Path | None = None
    explicit_model_control: bool = False
    load_models: tuple[str, ...] = ()
    load_all: bool = True
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
    stub = stubs / version / STUB_NAME
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
    copies.append((_stub_path(), target_dir / STUB_NAME))
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
        names = config.load_models or (("*",) if config.load_all else ())
        cmd += [f"--load-model={name}" for name in names]
    elif config.load_models:
        raise ValueError("load_models is only used with explicit_model_control=True")
    cmd += ["--exit-timeout-secs", "5", "--log-verbose", "0"]
    if shm_region_prefix is not None:
        cmd.append(f"--backend-config=python,shm-region-prefix-name={shm_region_prefix}")
    cmd += list(config.extra_args)
    return cmd
