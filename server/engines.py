"""What the service reads from a tensorrt repository: the sizes its engines serve, the host they need.

``t2i-export --target tensorrt`` records both in the repository manifest (``t2i-repository.json``):
``"resolutions": ["1024x576", "512x512"]`` (width x height, one optimisation profile each) and
``"engine": {"gpu", "compute_capability", "tensorrt"}``. A request for another size is a 400 naming
the served sizes; engines built on another GPU model or TensorRT version are refused at start with
the command that rebuilds them (Triton itself would fail to deserialize them, or worse, run them
slowly on a GPU they were not tuned for).  The manifest's ``"models"`` are the base models a bundled
Triton loads at start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from export.contract.engines import EngineHost, Resolution, host_mismatch
from export.contract.specs import MANIFEST_FILE
from export.models.refit import import_tensorrt
from server import hardware

logger = logging.getLogger(__name__)


class EngineHostMismatch(RuntimeError):
    """The repository's engines were built for another GPU model or TensorRT version."""


class NotExported(RuntimeError):
    """The model repository holds no exported model: the message is the command that exports it."""


def require_exported(repository: Path, model_id: str, gpu: bool) -> None:
    """Raise :class:`NotExported` naming the exact export command when ``repository`` has no manifest
    (``t2i-export`` writes it last, once every model is in place)."""
    if (repository / MANIFEST_FILE).is_file():
        return
    target = "tensorrt" if gpu else "python-onnx"
    raise NotExported(
        f"no exported models in {repository} ({MANIFEST_FILE} is missing); build them first with: "
        f"t2i-export {model_id} --target {target} --out {repository}"
        + (
            f" (with the Docker image: docker run --rm --gpus all -v <volume>:/models triton-t2i "
            f"t2i-export {model_id} --target {target} --out {repository})"
            if gpu
            else ""
        )
    )


@dataclass(frozen=True)
class RepositoryEngines:
    target: str = ""
    # Sizes the engines serve; empty: any size the service's own rules allow.
    resolutions: tuple[Resolution, ...] = ()
    built_on: EngineHost | None = None
    # GPU indices Triton places the models on (t2i-export --gpus); empty: every GPU.
    gpus: tuple[int, ...] = ()

    def serves(self, width: int, height: int) -> bool:
        return not self.resolutions or Resolution(width, height) in self.resolutions

    def served_sizes(self) -> str:
        return ", ".join(str(r) for r in self.resolutions)


def read_repository(repository: Path) -> RepositoryEngines:
    """The manifest's target, buckets and build host (defaults where the manifest has none)."""
    try:
        manifest = json.loads((repository / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return RepositoryEngines()
    if not isinstance(manifest, dict):
        return RepositoryEngines()
    resolutions = tuple(Resolution.parse(str(r)) for r in manifest.get("resolutions") or ())
    engine = manifest.get("engine")
    built_on = EngineHost.from_dict(engine) if isinstance(engine, dict) else None
    gpus = tuple(int(g) for g in manifest.get("gpus") or ())
    return RepositoryEngines(str(manifest.get("target", "")), resolutions, built_on, gpus)


def repository_models(repository: Path) -> tuple[str, ...]:
    """The base models an exported repository lists in its manifest (empty: load everything)."""
    try:
        manifest = json.loads((repository / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return ()
    return tuple(str(name) for name in manifest.get("models", []))


def tensorrt_version() -> str:
    """The TensorRT version of this host: the Python package's, else the NGC images' ``TRT_VERSION``
    variable, else "" (unknown: not compared)."""
    try:
        trt = import_tensorrt()
        version = str(getattr(trt, "__version__", ""))
        if version:
            return version
    except Exception:  # not installed, or a stub without the libraries
        pass
    return os.environ.get("TRT_VERSION", "")


def running_hosts() -> dict[int, EngineHost]:
    """This host's GPUs by NVML index (their model) with this host's TensorRT version; empty without
    GPUs. NVML counts every GPU in PCI bus order; the image sets CUDA_DEVICE_ORDER=PCI_BUS_ID so that
    CUDA's (Triton's, t2i-export's) indices are the same."""
    version = tensorrt_version()
    return {
        index: EngineHost(str(d["name"]), f"{d['major']}.{d['minor']}", version, index)
        for index, d in hardware.gpu_devices(stats=False).items()
    }


def check_engine_host(
    engines: RepositoryEngines, running: Mapping[int, EngineHost], repository: Path, model_id: str
) -> None:
    """Raise :class:`EngineHostMismatch` unless every GPU Triton runs the engines on (the manifest's
    ``gpus``, else all of ``running``) can run them."""
    if engines.built_on is None:
        return
    rebuild = f"re-export on this host: t2i-export {model_id} --target tensorrt --out {repository}"
    if not running:
        raise EngineHostMismatch(
            f"the TensorRT engines in {repository} need a GPU ({engines.built_on}) and NVML finds none "
            "here; run the service on the GPU host they were built on, or " + rebuild
        )
    devices = engines.gpus or tuple(running)
    reasons = []
    for device in devices:
        host = running.get(device)
        if host is None:
            reasons.append(f"GPU {device} (named by --gpus at export) is not on this host")
            continue
        reason = host_mismatch(engines.built_on, host)
        if reason is not None:
            reasons.append(f"GPU {device}: {reason}")
    if reasons:
        raise EngineHostMismatch(
            f"the TensorRT engines in {repository} were built on {engines.built_on} and cannot run "
            f"here ({'; '.join(reasons)}); {rebuild}"
        )
    if not all(running[d].tensorrt for d in devices):
        logger.info("TensorRT version of this host unknown: engines checked against the GPU model only")
