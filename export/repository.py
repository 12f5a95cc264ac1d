"""Writes a Triton model repository for a diffusers model: one Triton model per component.

Each model directory holds a ``config.pbtxt`` generated from Triton's ``ModelConfig`` protobuf, the
exported weights under ``1/`` and an ``.export.json`` fingerprint of what it was built from.  A
component whose fingerprint is unchanged is reused as it is, so a second export of the same model is
a no-op.  Directories are built beside their final place and swapped in whole, so an interrupted
export never leaves a half-written model that Triton would try to load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.modules import Component, components
from export.onnx_export import check_onnx, export_onnx
from export.safety import SafetyCheckerSource, model_safety_checker
from export.source import ModelSource, resolve_model
from export.specs import ModelSpec, TensorSpec

logger = logging.getLogger(__name__)

Target = Literal["python-onnx"]
TARGETS: tuple[Target, ...] = ("python-onnx",)

# Bump when the exported graphs or the generated configs change meaning, to invalidate caches.
EXPORT_VERSION = "2"
FINGERPRINT_FILE = ".export.json"
MANIFEST_FILE = "t2i-repository.json"
PYTHON_ONNX_MODEL = Path(__file__).resolve().parents[1] / "model_repository" / "python_onnx" / "model.py"

_DTYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int32": mc.TYPE_INT32, "int64": mc.TYPE_INT64}


@dataclass(frozen=True)
class RepositoryOptions:
    target: Target = "python-onnx"
    check: bool = True
    # Zero: a batch forms from what is queued when the model is free, so a lone request never waits
    # and concurrent ones still meet while the model is busy (bench/RESULTS.md, overhead).
    max_queue_delay_us: int = 0


def model_config(spec: ModelSpec, options: RepositoryOptions) -> mc.ModelConfig:
    """The Triton config of one model: batched I/O from the spec and the dynamic batcher on."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if options.target == "python-onnx":
        config.backend = "python"
        config.parameters["onnx_file"].string_value = "model.onnx"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
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


def export_repository(
    model_id: str, out: Path, options: RepositoryOptions | None = None, safety_checker: str | None = None
) -> Path:
    """Export ``model_id`` (Hub id or diffusers folder) into the Triton repository ``out``.

    ``safety_checker`` is a folder (or Hub id) holding a safety checker, either a diffusers model with a
    ``safety_checker/`` subfolder or the checker itself; None means the model's own checker when its
    ``model_index.json`` lists one.  It becomes the ``safety_checker`` model, with its feature
    extractor's ``preprocessor_config.json`` under ``safety_checker/feature_extractor/``.
    """
    options = options or RepositoryOptions()
    source = ModelSource(resolve_model(model_id, weights=True))
    out.mkdir(parents=True, exist_ok=True)
    parts = components(source)
    # The folder each component's subfolders are relative to, and extra files written beside its config.
    roots = {c.spec.name: source.path for c in parts}
    extras: dict[str, Callable[[Path], object]] = {}
    checker = (
        model_safety_checker(source.path)
        if safety_checker is None
        else SafetyCheckerSource.find(resolve_model(safety_checker, weights=True))
    )
    if checker is not None:
        parts.append(checker.component())
        roots[parts[-1].spec.name] = checker.root
        extras[parts[-1].spec.name] = checker.write_feature_extractor
    start = time.perf_counter()
    for i, component in enumerate(parts, 1):
        name = component.spec.name
        step = f"[{i}/{len(parts)}] {name}"
        fingerprint = _fingerprint(roots[name], component, options)
        model_dir = out / name
        if _cached(model_dir, fingerprint):
            logger.info("%s: unchanged, reusing %s", step, model_dir)
            continue
        logger.info("%s: exporting from %s ...", step, roots[name])
        _build_model(component, options, model_dir, fingerprint, extras.get(name))
    manifest = {
        "model": str(source.path),
        "pipeline": source.pipeline_class,
        "target": options.target,
        "models": [c.spec.name for c in parts],
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("repository %s ready in %.1f s", out, time.perf_counter() - start)
    return out


def _build_model(
    component: Component,
    options: RepositoryOptions,
    model_dir: Path,
    fingerprint: str,
    write_extras: Callable[[Path], object] | None = None,
) -> None:
    spec = component.spec
    staging = model_dir.with_name(f".{model_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / "1"
    version_dir.mkdir(parents=True)
    module = component.load().eval()
    onnx_path = version_dir / "model.onnx"
    export_onnx(module, spec, component.trace_sizes, onnx_path)
    if options.check:
        check_onnx(module, spec, onnx_path)
    shutil.copyfile(PYTHON_ONNX_MODEL, version_dir / "model.py")
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


def _fingerprint(root: Path, component: Component, options: RepositoryOptions) -> str:
    """Hash of everything the model directory is built from: weights, configs, spec, options, code.

    The component's subfolders are relative to ``root`` (the model folder, or a safety checker's).
    """
    h = hashlib.sha256()
    h.update(f"{EXPORT_VERSION}|{component.spec!r}|{options!r}|{component.trace_sizes!r}".encode())
    h.update(PYTHON_ONNX_MODEL.read_bytes())
    for sub in component.subfolders:
        for f in sorted((root / sub).rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(root)).encode())
                with f.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()
