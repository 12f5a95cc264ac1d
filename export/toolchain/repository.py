"""Writes a Triton model repository for a diffusers model: one Triton model per component, exported and
checked one at a time (``t2i-export``; its options: :mod:`export.toolchain.options`).

Each model directory holds a ``config.pbtxt`` (:mod:`export.toolchain.triton_config`), the exported
weights under ``1/`` (the files read: :mod:`export.toolchain.origins`) and an ``.export.json``
fingerprint of what it was built from.  A component whose fingerprint is unchanged is reused as it
is, so a second export of the same model is a no-op.  Directories are built beside their final place
and swapped in whole, so an interrupted export never leaves a half-written model that Triton would try
to load.
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
from dataclasses import dataclass, replace
from pathlib import Path

from export.contract import engines
from export.contract.specs import FINGERPRINT_FILE, MANIFEST_FILE
from export.models.heap import release_memory
from export.models.modules import Component, components
from export.models.precision import (
    PRECISIONS,
    TOLERANCES,
    TORCH_DTYPES,
    Precision,
    component_precision,
    float32_compute,
    with_precision,
)
from export.models.safety import SafetyCheckerSource, model_safety_checker
from export.models.source import ModelSource
from export.models.tokenizer import write_serving_tokenizers
from export.models.weights import WeightChoice
from export.toolchain import engine_memory, tensorrt, tensorrt_plan
from export.toolchain.onnx_export import compare_onnx, export_onnx, reference_outputs
from export.toolchain.options import RepositoryOptions
from export.toolchain.origins import Origin, choose_weights
from export.toolchain.torch_check import check_torch_model
from export.toolchain.triton_config import config_text, model_config
from export.triton_models.torch_source import cuda_dtype_for, write_torch_model

logger = logging.getLogger(__name__)

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
    origin = Origin.resolve(model_id)
    source = ModelSource(origin.root)
    if options.target == "tensorrt":
        resolutions = options.engine.resolutions or engines.default_resolutions(source.default_size)
        engines.check_resolutions(resolutions, source.vae_scale_factor)
        options = replace(options, engine=replace(options.engine, resolutions=resolutions))
    parts = components(source)
    if options.target == "tensorrt":
        parts = [replace(c, spec=tensorrt_plan.engine_spec(c.spec, options.engine.max_batch)) for c in parts]
    origins = {c.spec.name: origin for c in parts}
    # Extra files written beside a component's config.
    extras: dict[str, Callable[[Path], object]] = {}
    checker_origin = origin if safety_checker is None else Origin.resolve(safety_checker)
    checker = (
        model_safety_checker(source.path)
        if safety_checker is None
        else SafetyCheckerSource.find(checker_origin.root)
    )
    if checker is not None:
        checker_part = checker.component()
        if options.target == "tensorrt":
            checker_part = replace(
                checker_part, spec=tensorrt_plan.engine_spec(checker_part.spec, options.engine.max_batch)
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
    plans: dict[str, tensorrt_plan.EnginePlan] = {}
    if options.target == "tensorrt":
        for component in parts:
            plans[component.spec.name] = engine_plan(
                component, source if component.root == source.path else None, source.vae_scale_factor, options
            )
    weights = choose_weights(parts, origins, precisions, options.variant)
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


PLAN_FILE = "plan.json"


def engine_plan(
    component: Component, source: ModelSource | None, vae_scale: int, options: RepositoryOptions
) -> tensorrt_plan.EnginePlan:
    """One engine's plan before its ONNX graph exists: precision, builder flags, profiles, config."""
    spec = component.spec
    precision, reason = component_precision(source, spec.name, options.resolved_precision)
    profiles = tensorrt_plan.engine_profiles(spec, options.engine.resolutions, vae_scale)
    workspace = options.engine.workspace_gib
    return tensorrt_plan.EnginePlan(
        name=spec.name,
        precision=precision,
        precision_reason=reason,
        flags=tensorrt_plan.build_flags(precision, spec.name in tensorrt_plan.REFITTABLE_MODELS),
        profiles=tuple(profiles),
        config=config_text(model_config(spec, options, len(profiles))),
        workspace_bytes=None if workspace is None else int(workspace * (1 << 30)),
    )


def with_memory(plan: tensorrt_plan.EnginePlan, onnx_path: Path) -> tensorrt_plan.EnginePlan:
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
    plans: dict[str, tensorrt_plan.EnginePlan],
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


def component_precision_of(plan: tensorrt_plan.EnginePlan) -> Precision:
    precision = plan.precision
    assert precision in PRECISIONS, precision
    return precision  # type: ignore[return-value]


def _write_plan_file(plans: dict[str, tensorrt_plan.EnginePlan], out: Path) -> None:
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
    plan: tensorrt_plan.EnginePlan | None = None


def _build_model(
    component: Component,
    options: RepositoryOptions,
    model_dir: Path,
    fingerprint: str,
    write_extras: Callable[[Path], object] | None = None,
    build: _Build | None = None,
    weights: WeightChoice | None = None,
) -> tensorrt_plan.EnginePlan | None:
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
    plan: tensorrt_plan.EnginePlan | None = None
    if options.target == "tensorrt":
        assert build.host is not None and build.timing_cache is not None and build.plan is not None
        plan = with_memory(build.plan, onnx_path)
        plan_file = version_dir / tensorrt_plan.PLAN_FILE
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
