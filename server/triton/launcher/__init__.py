"""Run ``tritonserver`` on one of our model repositories: the binary bundled in the
``nvidia-pytriton`` wheel (prepared to run from this interpreter's environment) or a host's own.

- :mod:`.binary`: where ``tritonserver`` comes from, its environment, its backend directory and its
  command line (:class:`TritonLaunchConfig`);
- :mod:`.processes`: facts about its processes (psutil) and the cleanup of what a launch leaves:
  stubs, the process group, shared-memory regions;
- :mod:`.bundled`: :class:`BundledTriton`, one server's lifecycle (start, readiness, stop, a stale
  server of the same state dir ended first).
"""

from server.triton.launcher.binary import (
    HOST,
    INSTALL_HINT,
    TritonLaunchConfig,
    TritonStartError,
    build_command,
    find_free_ports,
    prepare_backend_directory,
    system_tritonserver,
    tritonserver_binary,
    tritonserver_env,
)
from server.triton.launcher.bundled import PID_FILE, BundledTriton
from server.triton.launcher.processes import process_stat, remove_shm_regions, stub_model, stub_processes

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "PID_FILE",
    "BundledTriton",
    "TritonLaunchConfig",
    "TritonStartError",
    "build_command",
    "find_free_ports",
    "prepare_backend_directory",
    "process_stat",
    "remove_shm_regions",
    "stub_model",
    "stub_processes",
    "system_tritonserver",
    "tritonserver_binary",
    "tritonserver_env",
]
