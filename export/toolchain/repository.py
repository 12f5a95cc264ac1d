"""Writes a Triton model repository for a diffusers model: one Triton model per component.

Each model directory holds a ``config.pbtxt`` generated from Triton's ``ModelConfig`` protobuf, the
exported weights under ``1/`` and an ``.export.json`` fingerprint of what it was built from.  A
component whose fingerprint is unchanged is reused as it is, so a second export of the same model is
a no-op.  Directories are built beside their final place and swapped in whole, so an interrupted
export never leaves a half-written model that Triton would try to load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.contract import engines
from export.contract.specs import FINGERPRINT_FILE, MANIFEST_FILE, ModelSpec, TensorSpec
from export.models.heap import release_memory
from export.models.modules import Component, components
from export.models.precision import (
    PRECISIONS,
    TOLERANCES,
    TORCH_DTYPES,
    Precision,
    component_precision,
    default_precision,
    float32_compute,
    with_precision,
)
from export.models.safety import SafetyCheckerSource, model_safety_checker
from export.models.source import CONFIG_PATTERNS, ModelSource, fetch_files, hub_files, resolve_model
from export.models.tokenizer import write_serving_tokenizers
from export.models.weights import AUTO, WeightChoice, allow_patterns, folder_files
from export.toolchain import engine_memory, tensorrt
from export.toolchain.onnx_export import compare_onnx, export_onnx, reference_outputs
from export.triton_models.torch_model import (
    TorchOptions,
    check_torch_model,
    cuda_dtype_for,
    write_torch_model,
)

logger = logging.getLogger(__name__)

Target = Literal["python-onnx", "python-torch", "tensorrt"]
TARGETS: tuple[Target, ...] = ("python-onnx", "python-torch", "tensorrt")

# Bump when the exported graphs or the generated configs change meaning, to invalidate caches.
EXPORT_VERSION = "3"


def model_source(target_dir: str) -> Path:
    """The python-backend ``model.py`` kept in git under ``model_repository/<target_dir>/``.

    Found in the ``model_repository`` package (a namespace package holding only
    ``model_repository/python_*``, see pyproject.toml), so a wheel or non-editable install finds
    the installed copy and a checkout (or editable install) finds its own.  (Its search locations
    are read directly: importlib.resources.files fails on an editable install's namespace path.)
    """
    spec = importlib.util.find_spec("model_repository")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / target_dir / "model.py"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the Triton model source model_repository/{target_dir}/model.py is missing")


# The python-backend model.py folder each python target copies into every model directory. Resolved
# when used, not at import: an install may hold only some of them, and importing the export (the
# tensorrt target needs none) must not depend on them.
PYTHON_MODEL_DIRS: dict[str, str] = {"python-onnx": "python_onnx", "python-torch": "python_torch"}


def python_model(target: str) -> Path:
    """The ``model.py`` the python-backend ``target`` copies into each model directory."""
    return model_source(PYTHON_MODEL_DIRS[target])


_DTYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int32": mc.TYPE_INT32, "int64": mc.TYPE_INT64}


@dataclass(frozen=True)
class RepositoryOptions:
    target: Target = "python-onnx"
    check: bool = True
    # Zero: a batch forms from what is queued when the model is free, so a lone request never waits
    # and concurrent ones still meet while the model is busy (bench/RESULTS.md, overhead).
    max_queue_delay_us: int = 0
    # python-torch only: how the module runs (GPU speed switches, resident LoRA variants).
    torch: TorchOptions = field(default_factory=TorchOptions)
    # None: the target's default (fp16 for GPU targets, fp32 for python-onnx).
    precision: Precision | None = None
    # The tensorrt target's buckets, batch range, GPUs and workspace.
    engine: tensorrt.EngineOptions = field(default_factory=tensorrt.EngineOptions)
    # Which weight files to read (export/models/weights.py): "auto" (the precision's variant when present),
    # "none" (the full files only) or a variant name such as "fp16".
    variant: str = AUTO
    # tensorrt only: stop before the first TensorRT call and write the plan (no GPU, no TensorRT needed).
    plan_only: bool = False

    @property
    def resolved_precision(self) -> Precision:
        return self.precision or default_precision(self.target)


def model_config(spec: ModelSpec, options: RepositoryOptions, profiles: int = 1) -> mc.ModelConfig:
    """The Triton config of one model: batched I/O from the spec and the dynamic batcher on.

    ``profiles`` is the number of optimisation profiles of a tensorrt engine."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if options.target == "python-onnx":
        config.backend = "python"
        config.parameters["onnx_file"].string_value = "model.onnx"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    elif options.target == "python-torch":
        config.backend = "python"
        for key, value in options.torch.parameters().items():
            config.parameters[key].string_value = value
        # Inputs may stay in GPU memory (DLPack hands them to torch as they are).
        config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
        # One instance per GPU where there are GPUs, else one on CPU.
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)
    elif options.target == "tensorrt":
        tensorrt.engine_config(config, spec, profiles, options.engine)
    for t in spec.inputs:
        _tensor(config.input.add(), t)
    for t in spec.outputs:
        _tensor(config.output.add(), t)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    return config


def _tensor(message: mc.ModelInput | mc.ModelOutput, t: TensorSpec) -> None:
    message.name = t.name
    message.data_type = _DTYPES[t.dtype]
    dims = [-1 if isinstance(a, str) else a for a in t.shape[1:]]
    if dims:
        message.dims.extend(dims)
    else:
        # A per-row scalar ([batch] only): Triton needs a non-empty shape, so clients send [batch, 1]
        # and the backend sees [batch].
        message.dims.append(1)
        message.reshape.SetInParent()


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


@dataclass(frozen=True)
class _Origin:
    """Where a model folder came from: a local folder, or a Hub repository whose configs are in ``root``
    and whose weight files are fetched once chosen (from the repository's listing)."""

    model_id: str
    root: Path
    hub: bool

    @classmethod
    def resolve(cls, model_id: str) -> _Origin:
        hub = not Path(model_id).expanduser().is_dir()
        return cls(model_id, resolve_model(model_id, weights=False), hub)

    def files(self, root: Path) -> list[str]:
        """Every file of the model, relative to ``root`` (the folder a component's subfolders are
        relative to: this model's folder, or its parent for a checker that is a repository itself)."""
        if not self.hub:
            return folder_files(root)
        prefix = self.root.relative_to(root).as_posix()
        return [f if prefix == "." else f"{prefix}/{f}" for f in hub_files(self.model_id)]

    def fetch(self, choices: list[WeightChoice], root: Path) -> None:
        if self.hub and choices:
            logger.info("fetching %s: %s", self.model_id, ", ".join(c.describe() for c in choices))
            prefix = self.root.relative_to(root).as_posix()
            files = [f.removeprefix(f"{prefix}/") for f in allow_patterns(choices)]
            fetch_files(self.model_id, [*CONFIG_PATTERNS, *files])


def export_repository(
    model_id: str, out: Path, options: RepositoryOptions | None = None, safety_checker: str | None = None
) -> Path:
    """Export ``model_id`` (Hub id or diffusers folder) into the Triton repository ``out``.

    ``safety_checker`` is a folder (or Hub id) holding a safety checker, either a diffusers model with a
    ``safety_checker/`` subfolder or the checker itself; None means the model's own checker when its
    ``model_index.json`` lists one.  It becomes the ``safety_checker`` model, with its feature
    extractor's ``preprocessor_config.json`` under ``safety_checker/feature_extractor/``.

    Each component's weight files (one format, one variant: :mod:`export.models.weights`) are chosen before
    anything is exported, so a folder that lacks some fails at once; from a Hub id only those files are
    downloaded.  Components are exported one at a time, each loaded in its precision and freed before
    the next.
    """
    options = options or RepositoryOptions()
    # The same export whether its precision was named or defaulted (one fingerprint).
    options = replace(options, precision=options.resolved_precision)
    if options.plan_only and options.target != "tensorrt":
        raise ValueError("--plan is for --target tensorrt")
    host: engines.EngineHost | None = None
    if options.target == "tensorrt" and not options.plan_only:
        # Before any work: without TensorRT and a GPU nothing of this export could be used.
        host = tensorrt.current_host(options.engine.gpus)
        logger.info("building TensorRT engines on %s, CUDA device %d", host, host.device)
    origin = _Origin.resolve(model_id)
    source = ModelSource(origin.root)
    if options.target == "tensorrt":
        resolutions = options.engine.resolutions or engines.default_resolutions(source.default_size)
        engines.check_resolutions(resolutions, source.vae_scale_factor)
        options = replace(options, engine=replace(options.engine, resolutions=resolutions))
    parts = components(source)
    if options.target == "tensorrt":
        parts = [replace(c, spec=tensorrt.engine_spec(c.spec, options.engine.max_batch)) for c in parts]
    origins = {c.spec.name: origin for c in parts}
    # Extra files written beside a component's config.
    extras: dict[str, Callable[[Path], object]] = {}
    checker_origin = origin if safety_checker is None else _Origin.resolve(safety_checker)
    checker = (
        model_safety_checker(source.path)
        if safety_checker is None
        else SafetyCheckerSource.find(checker_origin.root)
    )
    if checker is not None:
        checker_part = checker.component()
        if options.target == "tensorrt":
            checker_part = replace(
                checker_part, spec=tensorrt.engine_spec(checker_part.spec, options.engine.max_batch)
            )
        parts.append(checker_part)
        origins[checker_part.spec.name] = checker_origin
        extras[checker_part.spec.name] = checker.write_feature_extractor
    precisions = {
        c.spec.name: component_precision(
            source if c.root == source.path else None, c.spec.name, options.resolved_precision
        )
        for c in parts
    }
    # Every engine's plan (profiles, flags, config) before any model is exported: a wrong one fails now.
    plans: dict[str, tensorrt.EnginePlan] = {}
    if options.target == "tensorrt":
        for component in parts:
            plans[component.spec.name] = engine_plan(
                component, source if component.root == source.path else None, source.vae_scale_factor, options
            )
    weights = _choose_weights(parts, origins, precisions, options.variant)
    if options.plan_only:
        return _write_plan(parts, plans, weights, out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, component in enumerate(parts, 1):
        name = component.spec.name
        step = f"[{i}/{len(parts)}] {name}"
        fingerprint = _fingerprint(component, options, weights[name])
        if host is not None:
            fingerprint = engines.engine_fingerprint(fingerprint, host)
        model_dir = out / name
        if _cached(model_dir, fingerprint):
            logger.info("%s: unchanged, reusing %s", step, model_dir)
            continue
        logger.info("%s: exporting from %s ...", step, weights[name].describe())
        if options.target == "python-torch":
            _build_torch_model(
                component, options, model_dir, fingerprint, source, weights[name], extras.get(name)
            )
            continue
        precision, reason = precisions[name]
        logger.info("%s: %s (%s)", step, precision, reason)
        build = _Build(precision, host, out / tensorrt.TIMING_CACHE_FILE, plans.get(name))
        built = _build_model(
            component, options, model_dir, fingerprint, extras.get(name), build, weights[name]
        )
        if built is not None:
            plans[name] = built
        release_memory()
    write_serving_tokenizers(source, out)
    if plans:
        _write_plan_file(plans, out)
    manifest: dict[str, object] = {
        "model": str(source.path),
        "pipeline": source.pipeline_class,
        "target": options.target,
        "models": [c.spec.name for c in parts],
        "precision": options.resolved_precision,
        "weights": {name: list(choice.files) for name, choice in weights.items()},
    }
    if host is not None:
        # The service reads the buckets from here (a size outside them is a 400) and checks the host,
        # on every GPU the models are placed on (empty: all).
        manifest["resolutions"] = [str(r) for r in options.engine.resolutions]
        manifest["engine"] = host.as_dict()
        manifest["gpus"] = list(options.engine.gpus)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("repository %s ready in %.1f s", out, time.perf_counter() - start)
    return out


def _choose_weights(
    parts: list[Component],
    origins: dict[str, _Origin],
    precisions: dict[str, tuple[Precision, str]],
    variant: str,
) -> dict[str, WeightChoice]:
    """Each component's weight files, chosen from its origin's listing; a Hub origin then downloads
    exactly those.  Raises :class:`export.models.weights.MissingWeightsError` for the first folder
    lacking any."""
    listings: dict[tuple[_Origin, Path], list[str]] = {}
    weights: dict[str, WeightChoice] = {}
    for c in parts:
        key = (origins[c.spec.name], c.root)
        if key not in listings:
            listings[key] = key[0].files(c.root)
        weights[c.spec.name] = c.weights(precisions[c.spec.name][0], variant, files=listings[key])
    for origin, root in listings:
        chosen = [weights[c.spec.name] for c in parts if (origins[c.spec.name], c.root) == (origin, root)]
        origin.fetch(chosen, root)
    return weights


PLAN_FILE = "plan.json"


def engine_plan(
    component: Component, source: ModelSource | None, vae_scale: int, options: RepositoryOptions
) -> tensorrt.EnginePlan:
    """One engine's plan before its ONNX graph exists: precision, builder flags, profiles, config."""
    spec = component.spec
    precision, reason = component_precision(source, spec.name, options.resolved_precision)
    profiles = tensorrt.engine_profiles(spec, options.engine.resolutions, vae_scale)
    workspace = options.engine.workspace_gib
    return tensorrt.EnginePlan(
        name=spec.name,
        precision=precision,
        precision_reason=reason,
        flags=tensorrt.build_flags(precision, spec.name in tensorrt.REFITTABLE_MODELS),
        profiles=tuple(profiles),
        config=config_text(model_config(spec, options, len(profiles))),
        workspace_bytes=None if workspace is None else int(workspace * (1 << 30)),
    )


def with_memory(plan: tensorrt.EnginePlan, onnx_path: Path) -> tensorrt.EnginePlan:
    """``plan`` with the weight bytes of its ONNX graph and the activation estimate of its largest
    profile (the one every execution context is sized for)."""
    estimates = [
        engine_memory.activation_estimate(onnx_path, {name: s[2] for name, s in p.shapes.items()})
        for p in plan.profiles
    ]
    largest = max(estimates, key=lambda e: e.peak_bytes)
    return replace(
        plan,
        weight_bytes=engine_memory.weight_bytes(onnx_path),
        activation_bytes=largest.peak_bytes,
        unknown_shapes=largest.unknown_tensors,
    )


def _write_plan(
    parts: list[Component],
    plans: dict[str, tensorrt.EnginePlan],
    weights: dict[str, WeightChoice],
    out: Path,
) -> Path:
    """``--plan``: each model's fp16 (or fp32) ONNX graph exported and checked on CPU, its memory read
    from it, and the whole plan written to ``out/plan.json`` and printed; nothing else is written."""
    with tempfile.TemporaryDirectory(prefix="t2i-plan-") as tmp:
        for i, component in enumerate(parts, 1):
            name = component.spec.name
            precision = component_precision_of(plans[name])
            logger.info("[%d/%d] %s: exporting the %s graph for the plan ...", i, len(parts), name, precision)
            onnx_path = Path(tmp) / name / "model.onnx"
            onnx_path.parent.mkdir(parents=True)
            _export_checked(component, precision, onnx_path, True, weights[name])
            release_memory()
            plans[name] = with_memory(plans[name], onnx_path)
    _write_plan_file(plans, out)
    for plan in plans.values():
        print(plan.summary())
    total = sum(p.memory_estimate_bytes or 0 for p in plans.values())
    print(f"all models, one instance each: {total / (1 << 20):.1f} MiB of GPU memory (estimate)")
    return out / PLAN_FILE


def component_precision_of(plan: tensorrt.EnginePlan) -> Precision:
    precision = plan.precision
    assert precision in PRECISIONS, precision
    return precision  # type: ignore[return-value]


def _write_plan_file(plans: dict[str, tensorrt.EnginePlan], out: Path) -> None:
    document = {
        "note": "weights exact (the ONNX initializers at the engine's precision); activations an estimate "
        "per execution context (peak live intermediate tensors at the largest profile), until a build "
        "records TensorRT's own size",
        "models": [p.as_dict() for p in plans.values()],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n")


def _export_checked(
    component: Component, precision: Precision, onnx_path: Path, check: bool, weights: WeightChoice | None
) -> None:
    """Export ``component`` at ``precision`` to ``onnx_path``; with ``check``, against float32 arithmetic.

    Memory: the module in its precision, its weights written straight into the graph's data file, then
    freed before onnxruntime loads the graph for the check against the outputs computed before the
    export."""
    spec = component.spec
    module = component.load(TORCH_DTYPES[precision], weights).eval()
    references = None
    if check:
        # Against float32 arithmetic, whatever the graph's precision: that is what parity means. An
        # fp16 module computes in float32 one submodule at a time, so no float32 copy is made.
        with float32_compute(module):
            references = reference_outputs(module, spec)
    export_onnx(with_precision(module, precision), spec, component.trace_sizes, onnx_path)
    del module
    release_memory()
    if references is not None:
        compare_onnx(onnx_path, spec, references, TOLERANCES[precision])


@dataclass(frozen=True)
class _Build:
    """What one model's build needs beyond the component and the options."""

    precision: Precision = "fp32"
    host: engines.EngineHost | None = None
    timing_cache: Path | None = None
    plan: tensorrt.EnginePlan | None = None


def _build_model(
    component: Component,
    options: RepositoryOptions,
    model_dir: Path,
    fingerprint: str,
    write_extras: Callable[[Path], object] | None = None,
    build: _Build | None = None,
    weights: WeightChoice | None = None,
) -> tensorrt.EnginePlan | None:
    """Export one model directory; for the tensorrt target, build its engine from ``build.plan`` (and
    return the plan with its memory filled in)."""
    build = build or _Build()
    spec = component.spec
    staging = model_dir.with_name(f".{model_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / "1"
    version_dir.mkdir(parents=True)
    onnx_path = version_dir / "model.onnx"
    _export_checked(component, build.precision, onnx_path, options.check, weights)
    record: dict[str, object] = {"fingerprint": fingerprint, "precision": build.precision}
    plan: tensorrt.EnginePlan | None = None
    if options.target == "tensorrt":
        assert build.host is not None and build.timing_cache is not None and build.plan is not None
        plan = with_memory(build.plan, onnx_path)
        plan_file = version_dir / tensorrt.PLAN_FILE
        tensorrt.build_engine(onnx_path, plan_file, plan, timing_cache=build.timing_cache)
        if options.check:
            tensorrt.check_engine(
                plan_file, onnx_path, spec, plan.profiles, TOLERANCES[build.precision], build.host.device
            )
        config_pbtxt = plan.config
        record["engine"] = build.host.as_dict()
        record["plan"] = plan.as_dict()
    else:
        shutil.copyfile(python_model("python-onnx"), version_dir / "model.py")
        config_pbtxt = config_text(model_config(spec, options))
    (staging / "config.pbtxt").write_text(config_pbtxt)
    if write_extras is not None:
        write_extras(staging)
    (staging / FINGERPRINT_FILE).write_text(json.dumps(record) + "\n")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    return plan


def _build_torch_model(
    component: Component,
    options: RepositoryOptions,
    model_dir: Path,
    fingerprint: str,
    source: ModelSource,
    weights: WeightChoice,
    write_extras: Callable[[Path], object] | None = None,
) -> None:
    """A python-torch model directory: the module's source files (no ONNX; of the weights only the
    chosen files), checked by running the module rebuilt from them at the spec's check sizes."""
    spec = component.spec
    staging = model_dir.with_name(f".{model_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / "1"
    write_torch_model(component, version_dir, weights, cuda_dtype=cuda_dtype_for(source, spec))
    if options.check:
        check_torch_model(version_dir)
    shutil.copyfile(python_model("python-torch"), version_dir / "model.py")
    (staging / "config.pbtxt").write_text(config_text(model_config(spec, options)))
    if write_extras is not None:
        write_extras(staging)
    (staging / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)


def _cached(model_dir: Path, fingerprint: str) -> bool:
    try:
        recorded = json.loads((model_dir / FINGERPRINT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(recorded == fingerprint and (model_dir / "config.pbtxt").is_file())


def _fingerprint(component: Component, options: RepositoryOptions, weights: WeightChoice) -> str:
    """Hash of everything the model directory is built from: the chosen weight files, the other files
    of the component's subfolders (configs), spec, options, code."""
    h = hashlib.sha256()
    h.update(f"{EXPORT_VERSION}|{component.spec!r}|{options!r}|{component.trace_sizes!r}".encode())
    if options.target in PYTHON_MODEL_DIRS:
        h.update(python_model(options.target).read_bytes())
    root = component.root
    for f in sorted(component.source_files(weights)):
        h.update(f.encode())
        with (root / f).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
