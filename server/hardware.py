"""GPU information through NVML (``nvidia-ml-py``); an empty result where there is no GPU or driver.

Each GPU also reports the memory Triton's processes hold on it (``triton_memory_used``): the NVML
process list of the GPU, summed over ``tritonserver`` and its python backend stubs. NVML sees the
processes of this PID namespace: the bundled Triton always, a Triton in another container when the
two share it (docker-compose.yml's ``pid: service:triton``); 0 where none is visible.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)
# Executable names of Triton's processes that hold GPU memory (the server, python backend stubs).
TRITON_PROCESSES = frozenset({"tritonserver", "triton_python_backend_stub"})
_lock = threading.Lock()
_initialised: bool | None = None


def _nvml() -> Any | None:
    """The ``pynvml`` module once NVML is initialised, or None where it cannot be (no driver)."""
    global _initialised
    with _lock:
        if _initialised is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _initialised = True
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
                logger.info("no NVML (%s): hardware endpoints report no GPUs", e)
                _initialised = False
        if not _initialised:
            return None
    import pynvml

    return pynvml


def gpu_devices(*, stats: bool) -> dict[int, dict[str, Any]]:
    """Per GPU index: id, name, memory; with ``stats`` the utilisation, else the compute capability."""
    nvml = _nvml()
    if nvml is None:
        return {}
    devices: dict[int, dict[str, Any]] = {}
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            info: dict[str, Any] = {
                "id": _text(nvml.nvmlDeviceGetUUID(handle)),
                "name": _text(nvml.nvmlDeviceGetName(handle)),
                "memory_total": int(memory.total),
                "memory_free": int(memory.free),
                "triton_memory_used": _triton_memory(nvml, handle),
            }
            if stats:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                info |= {"utilization_compute": int(rates.gpu), "utilization_memory": int(rates.memory)}
            else:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                info |= {"major": int(major), "minor": int(minor)}
            devices[i] = info
    except Exception as e:
        logger.warning("NVML query failed: %s", e)
        return {}
    return devices


def _triton_memory(nvml: Any, handle: Any) -> int:
    """Bytes of GPU memory held by Triton's processes on the GPU ``handle`` (those NVML shows)."""
    used = 0
    try:
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception as e:  # NVMLError_NotSupported on some boards
        logger.debug("NVML process list unavailable: %s", e)
        return 0
    for process in processes:
        try:
            name = _text(nvml.nvmlSystemGetProcessName(process.pid))
        except Exception:  # the process ended, or lives in another PID namespace
            continue
        if name.rsplit("/", 1)[-1] in TRITON_PROCESSES and process.usedGpuMemory is not None:
            used += int(process.usedGpuMemory)
    return used


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
