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
- Everything decided before TensorRT runs is one :class:`EnginePlan` per model (precision, builder
  flags, profiles, config, memory), computed for every model before any export, printed by
  ``t2i-export --plan`` on any host, and consumed as it is by :func:`build_engine`.
- The network is strongly typed (TensorRT 9.1 and later; the image has 10.13): each layer runs in the
  type the ONNX graph gives it, so an fp16 graph runs in fp16 and the SDXL VAE kept fp32 stays fp32;
  TF32 is cleared for fp32 graphs (:func:`build_flags`).
- Not Polygraphy (what NVIDIA's demo/Diffusion builds with): it would replace the ~100 lines of
  :func:`build_engine` and :class:`EngineRunner` with its loaders, but the plan, the flag choices and
  the check stay ours, the build would be tested through another library's wrapper of the same calls,
  and it is one more pinned package in the image; the direct TensorRT 10 calls here are fewer.
- The UNet and text encoders are built refittable (``BuilderFlag.REFIT``, not ``REFIT_IDENTICAL``:
  LoRA variants change the weights), so a variant is the base engine refitted (export/models/refit.py).
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from export.contract import specs
from export.contract.engines import EngineHost, Resolution
from export.models.refit import TensorRTUnavailable, import_tensorrt

if TYPE_CHECKING:  # the service reads engine metadata here without importing torch
    from export.models.precision import Precision, Tolerance
    from export.toolchain.onnx_export import CheckResult

logger = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "tensorrt-timing.cache"
DEFAULT_MAX_BATCH = 8
# Models whose weights LoRA variants change: built refittable.
REFITTABLE_MODELS = frozenset({specs.UNET, specs.TEXT_ENCODER, specs.TEXT_ENCODER_2})
DOCKER_HINT = (
    "it is in the Docker image: docker run --gpus all -v models:/models triton-t2i "
    "t2i-export MODEL --target tensorrt --out /models/repository"
)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine."""


class EngineMismatchError(RuntimeError):
    """A built engine disagrees with onnxruntime on the same graph past the precision's tolerance."""


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


class ProfileError(ValueError):
    """An optimisation profile that leaves a dynamic axis without a size or outside the spec's range."""


def has_resolution(spec: specs.ModelSpec) -> bool:
    """Whether an image size fixes some of the spec's axes (latent sides, image sides, FLUX tokens)."""
    return any(axis in spec.axes for axis in specs.RESOLUTION_AXES)


_LEVELS = ("min", "opt", "max")


def engine_profiles(
    spec: specs.ModelSpec, resolutions: Sequence[Resolution], vae_scale: int
) -> list[Profile]:
    """The optimisation profiles of ``spec`` (its batch axis already the engine's, see
    :func:`engine_spec`), checked with :func:`check_profiles`.

    One per resolution for a model with axes an image size fixes (:data:`specs.RESOLUTION_AXES`: those
    are fixed in the profile), else one. Every other dynamic axis (batch, T5's ``sequence``, SD3's and
    FLUX's ``text_length``) spans its range in the spec, min to max with the spec's opt.
    """
    fixed: list[tuple[Resolution | None, dict[str, int]]]
    if has_resolution(spec):
        if not resolutions:
            raise ValueError(f"{spec.name}: an engine with latent sides needs at least one resolution")
        fixed = [
            (r, specs.resolution_sizes(r.height // vae_scale, r.width // vae_scale, vae_scale))
            for r in resolutions
        ]
    else:
        fixed = [(None, {})]
    profiles = []
    for resolution, bound in fixed:
        sizes = [
            {
                axis: bound[axis] if axis in bound else getattr(axis_range, level)
                for axis, axis_range in spec.axes.items()
            }
            for level in _LEVELS
        ]
        shapes = {
            t.name: (t.concrete(sizes[0]), t.concrete(sizes[1]), t.concrete(sizes[2])) for t in spec.inputs
        }
        profiles.append(Profile(resolution, shapes, sizes[1]))
    check_profiles(spec, profiles)
    return profiles


def check_profiles(spec: specs.ModelSpec, profiles: Sequence[Profile]) -> None:
    """Raise :class:`ProfileError` unless every profile gives every input a (min, opt, max) shape with
    min <= opt <= max on each axis and each dynamic axis within the spec's range."""
    if not profiles:
        raise ProfileError(f"{spec.name}: no optimisation profile")
    for index, profile in enumerate(profiles):
        where = f"{spec.name} profile {index} ({profile.resolution or 'any size'})"
        missing = {t.name for t in spec.inputs} - set(profile.shapes)
        if missing:
            raise ProfileError(f"{where}: no shapes for inputs {sorted(missing)}")
        for t in spec.inputs:
            triple = profile.shapes[t.name]
            for level, shape in zip(_LEVELS, triple, strict=True):
                if len(shape) != len(t.shape):
                    raise ProfileError(f"{where}: {t.name} {level} shape {shape} is not rank {len(t.shape)}")
            for position, axis in enumerate(t.shape):
                low, opt, high = (shape[position] for shape in triple)
                if not 1 <= low <= opt <= high:
                    raise ProfileError(
                        f"{where}: {t.name} axis {axis}: {low}/{opt}/{high} not ascending (min, opt, max)"
                    )
                if isinstance(axis, str):
                    allowed = spec.axes[axis]
                    if low < allowed.min or high > allowed.max:
                        raise ProfileError(
                            f"{where}: {t.name} axis {axis} {low}..{high} is outside the model's "
                            f"{allowed.min}..{allowed.max}"
                        )
                elif low != axis or high != axis:
                    raise ProfileError(f"{where}: {t.name} axis {position} is {low}..{high}, not {axis}")


@dataclass(frozen=True)
class BuildFlags:
    """The TensorRT flags of one engine's build, by their TensorRT 10 Python names.

    ``network``: ``NetworkDefinitionCreationFlag`` members; ``set`` / ``cleared``: ``BuilderFlag``
    members set on, or cleared from, the builder config (TensorRT enables TF32 by default).
    """

    network: tuple[str, ...]
    set: tuple[str, ...] = ()
    cleared: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {"network": list(self.network), "set": list(self.set), "cleared": list(self.cleared)}


def build_flags(precision: Precision, refittable: bool) -> BuildFlags:
    """Strongly typed (each layer runs in the ONNX graph's type: fp16 graphs in fp16, the SDXL VAE and
    the safety checker kept fp32 in fp32); refittable for the models LoRA variants change; TF32 cleared
    for fp32 graphs: they are fp32 because precision matters there (the SDXL VAE overflows fp16, the
    safety checker's verdict is a threshold), and TF32 rounds matmul and convolution inputs to 10-bit
    mantissas, which the fp32 engine check (1e-4 + 1e-3 x max) is not expected to meet."""
    return BuildFlags(
        network=("STRONGLY_TYPED",),
        set=("REFIT",) if refittable else (),
        cleared=("TF32",) if precision == "fp32" else (),
    )


@dataclass(frozen=True)
class EnginePlan:
    """Everything about one engine that is decided before TensorRT runs; the build consumes exactly this.

    ``weight_bytes`` (exact) and ``activation_bytes`` (an estimate per execution context, see
    :mod:`export.toolchain.engine_memory`) are filled in once the ONNX graph exists.
    """

    name: str
    precision: str
    precision_reason: str
    flags: BuildFlags
    profiles: tuple[Profile, ...]
    config: str  # the model's config.pbtxt (platform tensorrt_plan)
    workspace_bytes: int | None = None
    weight_bytes: int | None = None
    activation_bytes: int | None = None
    unknown_shapes: int = 0

    @property
    def contexts(self) -> int:
        """Execution contexts Triton's TensorRT backend creates per instance: one per listed profile."""
        return len(self.profiles)

    @property
    def memory_estimate_bytes(self) -> int | None:
        if self.weight_bytes is None or self.activation_bytes is None:
            return None
        return self.weight_bytes + self.contexts * self.activation_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "builder_flags": self.flags.as_dict(),
            "workspace_bytes": self.workspace_bytes,
            "profiles": [
                {
                    "resolution": str(p.resolution) if p.resolution else None,
                    "shapes": {
                        name: {level: list(shape) for level, shape in zip(_LEVELS, triple, strict=True)}
                        for name, triple in p.shapes.items()
                    },
                }
                for p in self.profiles
            ],
            "config_pbtxt": self.config,
            "memory": {
                "weight_bytes": self.weight_bytes,
                "activation_bytes_per_context_estimate": self.activation_bytes,
                "activation_tensors_of_unknown_shape": self.unknown_shapes,
                "execution_contexts": self.contexts,
                "total_bytes_estimate": self.memory_estimate_bytes,
            },
        }

    def summary(self) -> str:
        """A few lines for the console: profiles, flags, memory."""
        mib = 1 << 20

        def size(n: int | None) -> str:
            return "?" if n is None else f"{n / mib:.1f} MiB"

        flags = ", ".join(
            [*(f"network {f}" for f in self.flags.network), *(f"+{f}" for f in self.flags.set)]
            + [f"-{f}" for f in self.flags.cleared]
        )
        lines = [f"{self.name}: {self.precision} ({self.precision_reason}); flags {flags}"]
        for i, p in enumerate(self.profiles):
            shapes = "; ".join(
                f"{name} {'/'.join('x'.join(map(str, s)) for s in triple)}"
                for name, triple in p.shapes.items()
            )
            lines.append(f"  profile {i} ({p.resolution or 'any size'}): {shapes}")
        lines.append(
            f"  memory: weights {size(self.weight_bytes)} (exact) + {self.contexts} context(s) x activations "
            f"{size(self.activation_bytes)} (estimate"
            + (f", {self.unknown_shapes} tensors of unknown shape" if self.unknown_shapes else "")
            + f") = {size(self.memory_estimate_bytes)} per instance (estimate)"
        )
        return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------------
# TensorRT and the GPU (imported only here, only when called)
# --------------------------------------------------------------------------------------------------


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
