"""GPU information through NVML (``nvidia-ml-py``); an empty result where there is no GPU or driver.

The fields are the reference runner's (id, name, memory; utilisation or compute capability). There
is no per-process figure of Triton's GPU memory: NVML's process list carries host PIDs, which a
container's PID namespace (the image's bundled Triton, or compose's ``pid: service:triton``) never
matches. Triton reports its GPU memory itself, per GPU UUID, on its metrics port
(``nv_gpu_memory_used_bytes``, port 8002 by default): scrape that.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)
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


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_memory_used() -> int | None:
    """GPU memory in use on every GPU together (NVML: total - free); None without GPUs."""
    devices = gpu_devices(stats=False)
    if not devices:
        return None
    return sum(int(d["memory_total"]) - int(d["memory_free"]) for d in devices.values())
