"""TensorRT engines from the exported ONNX graphs: the build, the runner and the engine check.

These import ``tensorrt`` (TensorRT 10 Python API) and need a CUDA GPU; they run in the Docker image or
on a GPU host. What they build is decided beforehand, in plain Python, by
:mod:`export.toolchain.tensorrt_plan` (profiles, builder flags, the ``tensorrt_plan`` config): an
:class:`~export.toolchain.tensorrt_plan.EnginePlan` per model, consumed as it is by :func:`build_engine`.

- Not Polygraphy (what NVIDIA's demo/Diffusion builds with): it would replace the ~100 lines of
  :func:`build_engine` and :class:`EngineRunner` with its loaders, but the plan, the flag choices and
  the check stay ours, the build would be tested through another library's wrapper of the same calls,
  and it is one more pinned package in the image; the direct TensorRT 10 calls here are fewer.
- A timing cache beside the engines (``<repository>/tensorrt-timing.cache``) is read before and
  written after every build, so later builds on the same GPU skip most tactic timing.
- Engines only run on the GPU model and TensorRT version that built them: both are recorded in the
  model's ``.export.json`` and hashed into its fingerprint, so an export on another host rebuilds
  and a service on another host refuses the repository with the command that rebuilds it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.contract import specs
from export.contract.engines import EngineHost
from export.models.refit import TensorRTUnavailable, import_tensorrt
from export.toolchain.tensorrt_plan import EnginePlan, Profile

if TYPE_CHECKING:
    from export.models.precision import Tolerance
    from export.toolchain.onnx_export import CheckResult

logger = logging.getLogger(__name__)

TIMING_CACHE_FILE = "tensorrt-timing.cache"
DOCKER_HINT = (
    "it is in the Docker image: docker run --gpus all -v models:/models triton-t2i "
    "t2i-export MODEL --target tensorrt --out /models/repository"
)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine."""


class EngineMismatchError(RuntimeError):
    """A built engine disagrees with onnxruntime on the same graph past the precision's tolerance."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with one line that says where it is."""
    try:
        trt = import_tensorrt()
    except Exception as e:  # ImportError, or the PyPI stub package failing to fetch the real wheel
        raise TensorRTUnavailable(
            f"--target tensorrt needs TensorRT 10 (Python package 'tensorrt', {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'not importable'}) and a CUDA GPU; {DOCKER_HINT}"
        ) from None
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(
            f"the 'tensorrt' package here is a stub without the TensorRT API; {DOCKER_HINT}"
        )
    return trt


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"--target tensorrt needs a CUDA GPU and none is visible here; {DOCKER_HINT}"
        )


class GpuSelectionError(ValueError):
    """``--gpus`` names a device that is not there, or GPUs of different models (one engine each)."""


def current_host(gpus: Sequence[int] = ()) -> EngineHost:
    """Make the first of ``gpus`` (CUDA device indices as this process sees them, after
    ``CUDA_VISIBLE_DEVICES``; empty: every visible GPU, built on device 0) the current CUDA device, where
    TensorRT builds and the engine check runs, and return it with this process's TensorRT version.

    Raises :class:`GpuSelectionError` for an index that is not visible, or when the GPUs Triton will
    place the models on are not all one model (an engine runs only on the GPU model that built it)."""
    import torch

    trt = require_tensorrt()
    require_cuda()
    count = torch.cuda.device_count()
    devices = list(gpus) or list(range(count))
    missing = [d for d in devices if d >= count]
    if missing:
        raise GpuSelectionError(
            f"--gpus {','.join(map(str, missing))}: this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    hosts = {}
    for d in devices:
        major, minor = torch.cuda.get_device_capability(d)
        hosts[d] = EngineHost(torch.cuda.get_device_name(d), f"{major}.{minor}", str(trt.__version__), d)
    models = {(h.gpu, h.compute_capability) for h in hosts.values()}
    if len(models) > 1:
        named = ", ".join(f"{d}: {h.gpu}" for d, h in hosts.items())
        raise GpuSelectionError(
            f"the GPUs the models would run on are of different models ({named}); engines run only on the "
            "GPU model that built them: export once per GPU model, each with --gpus naming only its GPUs"
        )
    torch.cuda.set_device(devices[0])
    return hosts[devices[0]]


def _progress_monitor(trt: Any, name: str) -> Any:
    """An ``IProgressMonitor`` that logs each top-level build phase and its duration."""

    class BuildProgress(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._started: dict[str, float] = {}
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._started[phase_name] = time.perf_counter()
                self._steps[phase_name] = num_steps
            if parent_phase is None:
                logger.info("%s: TensorRT %s (%d steps) ...", name, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                started = self._started.pop(phase_name, time.perf_counter())
                self._steps.pop(phase_name, None)
            logger.debug("%s: TensorRT %s done in %.1f s", name, phase_name, time.perf_counter() - started)

    return BuildProgress()


def build_engine(onnx_path: Path, plan_path: Path, plan: EnginePlan, *, timing_cache: Path) -> None:
    """Build the engine of the ONNX graph ``onnx_path`` into ``plan_path`` (written atomically), exactly
    as ``plan`` says: its network and builder flags, profiles and workspace limit. Runs on the current
    CUDA device (:func:`use_gpu`)."""
    trt = require_tensorrt()
    start = time.perf_counter()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network_flags = 0
    for name in plan.flags.network:
        network_flags |= 1 << int(_flag(trt.NetworkDefinitionCreationFlag, name, plan.name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file finds external weight files (``model.onnx.data``) beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{plan.name}: TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    if plan.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.flags.set:
        config.set_flag(_flag(trt.BuilderFlag, name, plan.name))
    for name in plan.flags.cleared:
        config.clear_flag(_flag(trt.BuilderFlag, name, plan.name))
    for p in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in p.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning(
            "%s: timing cache %s is from another GPU or TensorRT; starting a new one", plan.name, timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = _progress_monitor(trt, plan.name)
    config.progress_monitor = monitor
    logger.info(
        "%s: building the TensorRT engine (%s, %d profile(s), flags %s%s) ...",
        plan.name,
        plan.precision,
        len(plan.profiles),
        plan.flags.as_dict(),
        f", timing cache {timing_cache}" if cache_bytes else "",
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{plan.name}: TensorRT could not build the engine (see the TensorRT log above)"
        )
    _write_atomic(plan_path, memoryview(serialized))
    _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    logger.info(
        "%s: engine %s (%.1f MiB) built in %.1f s",
        plan.name,
        plan_path,
        plan_path.stat().st_size / (1 << 20),
        time.perf_counter() - start,
    )


def _flag(enum: Any, name: str, model: str) -> Any:
    try:
        return getattr(enum, name)
    except AttributeError:
        raise EngineBuildError(f"{model}: this TensorRT has no {enum.__name__}.{name}") from None


def _write_atomic(path: Path, data: memoryview | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as fh:
            fh.write(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class EngineRunner:
    """Runs a serialized engine on CUDA (torch tensors as buffers): one batch at one profile."""

    def __init__(self, plan: bytes, name: str = "engine") -> None:
        import torch

        self._torch = torch
        trt = require_tensorrt()
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineBuildError(
                f"{name}: TensorRT cannot deserialize the engine (built by another TensorRT version "
                "or for another GPU?); re-export with t2i-export --target tensorrt on this host"
            )
        self.context = self.engine.create_execution_context()
        self.name = name

    def run(self, profile: int, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        torch, trt = self._torch, self._trt
        stream = torch.cuda.Stream()
        self.context.set_optimization_profile_async(profile, stream.cuda_stream)
        keep = []
        for name, array in feeds.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            tensor = torch.empty(shape, dtype=getattr(torch, dtype.name), device="cuda")
            results[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        torch.cuda.synchronize()  # the copies to the GPU ran on the default stream
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return [results[name].cpu().numpy() for name in outputs]


def check_engine(
    plan_path: Path,
    onnx_path: Path,
    spec: specs.ModelSpec,
    profiles: Sequence[Profile],
    tolerance: Tolerance,
    device: int = 0,
) -> list[CheckResult]:
    """Each output of the engine against onnxruntime on the same graph, at every profile's opt shape,
    both on CUDA device ``device`` (the engine on the current device, see :func:`current_host`).

    Raises :class:`EngineMismatchError` listing every result when one is past ``tolerance``.
    """
    from export.toolchain.onnx_export import CheckResult, example_inputs, onnx_runner

    reference, runner = onnx_runner(onnx_path, spec, gpu=True, device=device)
    engine = EngineRunner(plan_path.read_bytes(), spec.name)
    # TensorRT's own activation memory of one execution context (the largest profile's).
    device_memory = getattr(engine.engine, "device_memory_size_v2", None)
    logger.info("%s: TensorRT's activation memory per execution context: %s bytes", spec.name, device_memory)
    outputs = [t.name for t in spec.outputs]
    results: list[CheckResult] = []
    for index, profile in enumerate(profiles):
        feeds = example_inputs(spec, dict(profile.opt_sizes), seed=100 + index)
        expected = reference(feeds)
        got = engine.run(index, feeds, outputs)
        for name, ref, out in zip(outputs, expected, got, strict=True):
            ref32 = ref.astype(np.float32)
            if ref32.shape != out.shape:
                raise EngineMismatchError(
                    f"{spec.name}.{name}: engine shape {out.shape} != {runner} {ref32.shape}"
                )
            error = float(np.abs(ref32 - out.astype(np.float32)).max())
            allowed = tolerance.allowed(float(np.abs(ref32).max()))
            results.append(
                CheckResult(
                    dict(profile.opt_sizes), name, error if np.isfinite(error) else float("inf"), allowed
                )
            )
    for r in results:
        logger.info("%s engine vs %s: %s", spec.name, runner, r)
    bad = [r for r in results if not r.ok]
    if bad:
        raise EngineMismatchError(
            f"{spec.name}: the TensorRT engine does not match {runner}:\n" + "\n".join(map(str, bad))
        )
    return results
