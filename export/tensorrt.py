"""TensorRT engines from the exported ONNX graphs: profiles, Triton configs, fingerprints, build, check.

Everything up to the TensorRT call is plain Python and tested on any host: the resolution buckets,
one optimisation profile per bucket with the batch range, the ``tensorrt_plan`` Triton config, the
host identity that goes into the fingerprint. The build and the engine check import ``tensorrt``
(TensorRT 10 Python API) and need a CUDA GPU; they run in the Docker image or on a GPU host.

- One optimisation profile per resolution bucket the operator names (``--resolutions``): the latent
  sides are fixed per profile, the batch goes from 1 to ``--max-batch`` with its optimum at the
  spec's (2 for the UNet and text encoders: a guided image is two rows; 1 for the VAE). Models
  without a resolution axis (text encoders) get one profile. Triton picks the profile that fits
  each batch; a size outside every bucket is refused by the service with a 400 before it reaches
  Triton (the buckets are recorded in the repository manifest, ``t2i-repository.json``).
- The network is strongly typed where TensorRT has it (9.1 and later): each layer runs in the type
  the ONNX graph gives it, so an fp16 graph runs in fp16 and the SDXL VAE kept fp32 stays fp32.
  Older TensorRT gets the weakly typed network with the FP16/BF16 builder flag instead.
- The UNet and text encoders are built refittable (``BuilderFlag.REFIT``, not ``REFIT_IDENTICAL``:
  LoRA variants change the weights), so a variant is the base engine refitted (export/refit.py).
- A timing cache beside the engines (``<repository>/tensorrt-timing.cache``) is read before and
  written after every build, so later builds on the same GPU skip most tactic timing.
- Engines only run on the GPU model and TensorRT version that built them: both are recorded in the
  model's ``.export.json`` and hashed into its fingerprint, so an export on another host rebuilds
  and a service on another host refuses the repository with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from export import specs
from export.refit import TensorRTUnavailable

if TYPE_CHECKING:  # the service reads engine metadata here without importing torch
    from export.onnx_export import CheckResult
    from export.precision import Precision, Tolerance

logger = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "tensorrt-timing.cache"
# The API's default size (width x height); with the model's native square size, the default buckets.
API_DEFAULT_RESOLUTION = (1024, 576)
DEFAULT_MAX_BATCH = 8
# Models whose weights LoRA variants change: built refittable.
REFITTABLE_MODELS = frozenset({specs.UNET, specs.TEXT_ENCODER, specs.TEXT_ENCODER_2})
MIN_LATENT_SIDE = 8
DOCKER_HINT = (
    "it is in the Docker image: docker run --gpus all -v models:/models triton-t2i "
    "t2i-export MODEL --target tensorrt --out /models/repository"
)

_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ResolutionError(ValueError):
    """A resolution bucket the model cannot serve (not a multiple of the VAE scale, too small)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine."""


class EngineMismatchError(RuntimeError):
    """A built engine disagrees with onnxruntime on the same graph past the precision's tolerance."""


@dataclass(frozen=True, order=True)
class Resolution:
    """An image size in pixels, written ``WIDTHxHEIGHT`` like the API's width and height fields."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Resolution:
        match = _RESOLUTION.match(text)
        if match is None:
            raise ValueError(f"'{text}' is not a resolution WIDTHxHEIGHT such as 1024x576")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_resolutions(text: str) -> tuple[Resolution, ...]:
    """``"1024x576,512x512"`` -> the buckets, in the given order, without repeats."""
    parsed = [Resolution.parse(part) for part in text.split(",") if part.strip()]
    if not parsed:
        raise ValueError("no resolution given: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...]")
    return tuple(dict.fromkeys(parsed))


def default_resolutions(native_size: int) -> tuple[Resolution, ...]:
    """The model's native square size and the API's default size."""
    return tuple(dict.fromkeys((Resolution(native_size, native_size), Resolution(*API_DEFAULT_RESOLUTION))))


def check_resolutions(resolutions: Sequence[Resolution], vae_scale: int) -> None:
    """Raise :class:`ResolutionError` unless every side is a multiple of the VAE scale of at least 8
    latents (the service's own rule for height and width)."""
    minimum = MIN_LATENT_SIDE * vae_scale
    for r in resolutions:
        for side in (r.width, r.height):
            if side < minimum or side % vae_scale:
                raise ResolutionError(
                    f"resolution {r}: each side must be a multiple of {vae_scale} of at least {minimum}"
                )


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built. ``resolutions`` empty: the model's default buckets."""

    resolutions: tuple[Resolution, ...] = ()
    max_batch: int = DEFAULT_MAX_BATCH
    # GPU indices Triton places each model's instances on; empty: every GPU.
    gpus: tuple[int, ...] = ()
    # TensorRT's workspace pool limit; None: TensorRT's default (the GPU's memory).
    workspace_gib: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if any(g < 0 for g in self.gpus):
            raise ValueError("GPU indices must be >= 0")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise ValueError("the workspace limit must be positive")


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) shape per input, and the axis sizes at opt."""

    resolution: Resolution | None
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    opt_sizes: Mapping[str, int] = field(default_factory=dict)


def engine_spec(spec: specs.ModelSpec, max_batch: int) -> specs.ModelSpec:
    """``spec`` with its batch axis going to ``max_batch`` (opt clipped into range)."""
    batch = spec.axes["batch"]
    axes = dict(spec.axes)
    axes["batch"] = specs.AxisRange(1, min(batch.opt, max_batch), max_batch)
    return replace(spec, axes=axes)


def has_resolution(spec: specs.ModelSpec) -> bool:
    return "height" in spec.axes and "width" in spec.axes


def engine_profiles(
    spec: specs.ModelSpec, resolutions: Sequence[Resolution], vae_scale: int
) -> list[Profile]:
    """The optimisation profiles of ``spec`` (its batch axis already the engine's, see
    :func:`engine_spec`): one per resolution for a model with latent sides, else one."""
    batch = spec.axes["batch"]
    fixed: list[tuple[Resolution | None, dict[str, int]]]
    if has_resolution(spec):
        if not resolutions:
            raise ValueError(f"{spec.name}: an engine with latent sides needs at least one resolution")
        fixed = [
            (
                r,
                {
                    "height": r.height // vae_scale,
                    "width": r.width // vae_scale,
                    "image_height": r.height,
                    "image_width": r.width,
                },
            )
            for r in resolutions
        ]
    else:
        fixed = [(None, {})]
    profiles = []
    for resolution, sides in fixed:
        sizes = [{**sides, "batch": b} for b in (batch.min, batch.opt, batch.max)]
        shapes = {
            t.name: (t.concrete(sizes[0]), t.concrete(sizes[1]), t.concrete(sizes[2])) for t in spec.inputs
        }
        profiles.append(Profile(resolution, shapes, sizes[1]))
    return profiles


def engine_config(
    config: mc.ModelConfig, spec: specs.ModelSpec, profiles: int, options: EngineOptions
) -> mc.ModelConfig:
    """Make ``config`` (I/O and batching already set from the spec) a ``tensorrt_plan`` model on GPUs."""
    config.platform = "tensorrt_plan"
    config.default_model_filename = PLAN_FILE
    group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    group.gpus.extend(options.gpus)
    # Without a list Triton gives every instance the first profile only; with it, Triton picks the
    # profile that fits each batch's shapes.
    group.profile.extend(str(i) for i in range(profiles))
    return config


@dataclass(frozen=True)
class EngineHost:
    """What an engine is tied to: the GPU model and the TensorRT version that built it."""

    gpu: str
    compute_capability: str
    tensorrt: str

    def as_dict(self) -> dict[str, str]:
        return {"gpu": self.gpu, "compute_capability": self.compute_capability, "tensorrt": self.tensorrt}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineHost:
        return cls(str(data["gpu"]), str(data.get("compute_capability", "")), str(data["tensorrt"]))

    def __str__(self) -> str:
        return f"{self.gpu} (sm {self.compute_capability}) with TensorRT {self.tensorrt}"


def engine_fingerprint(graph_fingerprint: str, host: EngineHost) -> str:
    """The fingerprint of an engine: its graph's and build options' fingerprint plus the host."""
    h = hashlib.sha256(graph_fingerprint.encode())
    h.update(f"|gpu={host.gpu}|sm={host.compute_capability}|tensorrt={host.tensorrt}".encode())
    return h.hexdigest()


def host_mismatch(built: EngineHost, running: EngineHost) -> str | None:
    """Why engines built on ``built`` cannot run on ``running`` (None if they can). A running
    TensorRT version that is unknown ("") is not compared."""
    reasons = []
    if built.gpu != running.gpu:
        reasons.append(f"GPU {built.gpu} != this host's {running.gpu}")
    if running.tensorrt and built.tensorrt != running.tensorrt:
        reasons.append(f"TensorRT {built.tensorrt} != this host's {running.tensorrt}")
    return "; ".join(reasons) or None


# --------------------------------------------------------------------------------------------------
# TensorRT and the GPU (imported only here, only when called)
# --------------------------------------------------------------------------------------------------


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with one line that says where it is."""
    try:
        import tensorrt as trt
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


def current_host(device: int = 0) -> EngineHost:
    """The GPU ``device`` and the TensorRT version of this process."""
    import torch

    trt = require_tensorrt()
    require_cuda()
    major, minor = torch.cuda.get_device_capability(device)
    return EngineHost(torch.cuda.get_device_name(device), f"{major}.{minor}", str(trt.__version__))


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


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    spec: specs.ModelSpec,
    profiles: Sequence[Profile],
    *,
    precision: Precision,
    refittable: bool,
    options: EngineOptions,
    timing_cache: Path,
) -> None:
    """Build the engine of the ONNX graph ``onnx_path`` into ``plan_path`` (written atomically)."""
    trt = require_tensorrt()
    start = time.perf_counter()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # Strongly typed where the flag exists (TensorRT 9.1 to 10.x; where it is gone, as weak typing is in
    # TensorRT 11, networks are strongly typed and the FP16/BF16 builder flags are gone with it).
    # Explicit batch is the only mode since TensorRT 10 (its flag is deprecated, gone in 11): no flag.
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    strongly_typed = typed_flag is not None
    network = builder.create_network(0 if typed_flag is None else 1 << int(typed_flag))
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file finds external weight files (``model.onnx.data``) beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{spec.name}: TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    precision_flag = getattr(trt.BuilderFlag, {"fp16": "FP16", "bf16": "BF16"}.get(precision, ""), None)
    if not strongly_typed and precision_flag is not None:
        config.set_flag(precision_flag)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in p.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning(
            "%s: timing cache %s is from another GPU or TensorRT; starting a new one", spec.name, timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = _progress_monitor(trt, spec.name)
    config.progress_monitor = monitor
    logger.info(
        "%s: building the TensorRT engine (%s, %d profile(s), batch 1..%d%s%s) ...",
        spec.name,
        "strongly typed" if strongly_typed else precision,
        len(profiles),
        spec.axes["batch"].max,
        ", refittable" if refittable else "",
        f", timing cache {timing_cache}" if cache_bytes else "",
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{spec.name}: TensorRT could not build the engine (see the TensorRT log above)"
        )
    _write_atomic(plan_path, memoryview(serialized))
    _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    logger.info(
        "%s: engine %s (%.1f MiB) built in %.1f s",
        spec.name,
        plan_path,
        plan_path.stat().st_size / (1 << 20),
        time.perf_counter() - start,
    )


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
) -> list[CheckResult]:
    """Each output of the engine against onnxruntime on the same graph, at every profile's opt shape.

    Raises :class:`EngineMismatchError` listing every result when one is past ``tolerance``.
    """
    from export.onnx_export import CheckResult, example_inputs, onnx_runner

    reference, runner = onnx_runner(onnx_path, spec, gpu=True)
    engine = EngineRunner(plan_path.read_bytes(), spec.name)
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
