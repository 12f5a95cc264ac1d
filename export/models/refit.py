"""LoRA variants of a refittable TensorRT engine: the weights to set, and the refit itself.

A refittable engine built from the base UNet's ONNX graph names its refittable weights after the
ONNX initializers, which :mod:`export.toolchain.onnx_export` keeps named after the torch parameters. Moving
an engine from the variant it holds now to another one sets every weight that either variant
touches: the new variant's merged value where it has one, the base value elsewhere (which undoes
the old variant's changes). :func:`refit_weights` computes that map; :func:`refit_engine` applies it
with ``trt.Refitter`` (TensorRT 10 Python API), importing TensorRT only when called.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.contract.specs import VARIANT_KEY, VARIANT_SEPARATOR, VARIANTS_DIR

if TYPE_CHECKING:
    import torch

__all__ = [
    "RefitError",
    "TensorRTUnavailable",
    "refit_engine",
    "refit_variant",
    "refit_weights",
    "variant_model_name",
    "variant_refit_map",
]

logger = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """The ``tensorrt`` package cannot be imported on this host."""


class RefitError(RuntimeError):
    """TensorRT refused the refit (engine not refittable, unknown or missing weights)."""


def refit_weights(
    base_state: Mapping[str, torch.Tensor],
    previous_deltas: Mapping[str, torch.Tensor],
    new_deltas: Mapping[str, torch.Tensor],
    prefix: str = "unet.",
) -> dict[str, np.ndarray]:
    """``{ONNX initializer name: weight}`` that turns an engine holding ``previous_deltas`` into one
    holding ``new_deltas``.

    The keys of both delta maps are torch parameter names (as :func:`export.models.lora.merge_deltas`
    returns them); ``prefix`` is where the model sits in the exported wrapper
    (:data:`export.models.lora.ONNX_PREFIXES`). Every parameter in either map is set: to its new merged
    value if ``new_deltas`` has one, else back to ``base_state``. Arrays are contiguous and keep
    the base parameter's dtype and shape.
    """
    weights: dict[str, np.ndarray] = {}
    for param in sorted({*previous_deltas, *new_deltas}):
        if param not in base_state:
            raise KeyError(f"merged parameter '{param}' is not in the base state")
        base = base_state[param]
        value = new_deltas.get(param, base)
        if tuple(value.shape) != tuple(base.shape):
            raise ValueError(f"'{param}': merged shape {list(value.shape)} != base {list(base.shape)}")
        array = value.detach().to(base.dtype).cpu().numpy()
        weights[f"{prefix}{param}"] = np.ascontiguousarray(array)
    restored = len(set(previous_deltas) - set(new_deltas))
    logger.info("refit map: %d weights (%d restored to base)", len(weights), restored)
    return weights


def import_tensorrt() -> Any:
    """The TensorRT Python API: the ``tensorrt`` package, or where only its bindings wheel is installed
    (the Docker image: ``tensorrt-cuXX-bindings`` on the image's own libnvinfer) ``tensorrt_bindings``,
    which ``tensorrt`` merely re-exports. Raises ImportError (or the stub package's error)."""
    try:
        import tensorrt as trt
    except ImportError:
        import tensorrt_bindings as trt  # type: ignore[no-redef]
    return trt


def _tensorrt() -> Any:
    try:
        return import_tensorrt()
    except ImportError as e:  # also the PyPI stub that fails to fetch the real wheel
        raise TensorRTUnavailable(
            "refitting needs TensorRT (the 'tensorrt' package, e.g. pip install '.[tensorrt]' on a GPU host "
            f"or the Docker image): {e}"
        ) from e


def refit_engine(
    engine_path: Path,
    out: Path,
    weights: Mapping[str, np.ndarray],
    base_weights: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Refit the serialized engine ``engine_path`` with ``weights`` and write the result to ``out``.

    ``weights`` maps refittable weight names (the ONNX initializer names) to arrays in the ONNX
    layout, e.g. from :func:`refit_weights`. TensorRT may ask for more weights than were given
    (weights it fused with a given one); those are taken from ``base_weights`` when it has them.
    Raises :class:`TensorRTUnavailable` without TensorRT and :class:`RefitError` when the engine is
    not refittable, a name is not one of its refittable weights, weights are still missing, or the
    refit fails. ``out`` is written atomically (temporary file, then rename).
    """
    trt = _tensorrt()
    engine_path, out = Path(engine_path), Path(out)
    start = time.perf_counter()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RefitError(f"{engine_path}: TensorRT could not deserialize the engine")
    if not getattr(engine, "refittable", True):
        raise RefitError(f"{engine_path}: the engine was not built refittable (BuilderFlag.REFIT)")
    refitter = trt.Refitter(engine, trt_logger)
    refittable = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - refittable)
    if unknown:
        raise RefitError(
            f"{engine_path}: {len(unknown)} weight(s) are not refittable in this engine, e.g. '{unknown[0]}'"
        )
    # trt.Weights does not copy: the arrays must live until refit_cuda_engine() returns.
    keep: list[np.ndarray] = []

    def set_weight(name: str, array: np.ndarray) -> None:
        contiguous = np.ascontiguousarray(array)
        keep.append(contiguous)
        if not refitter.set_named_weights(name, trt.Weights(contiguous)):
            raise RefitError(f"{engine_path}: TensorRT rejected weight '{name}' {list(contiguous.shape)}")

    for name, array in weights.items():
        set_weight(name, array)
    missing = list(refitter.get_missing_weights())
    if missing and base_weights is not None:
        for name in missing:
            if name in base_weights:
                set_weight(name, base_weights[name])
        missing = list(refitter.get_missing_weights())
    if missing:
        raise RefitError(f"{engine_path}: refit still needs {len(missing)} weight(s), e.g. '{missing[0]}'")
    if not refitter.refit_cuda_engine():
        raise RefitError(f"{engine_path}: refit_cuda_engine() failed (see the TensorRT log)")
    serialized = engine.serialize()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as fh:
            fh.write(memoryview(serialized))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    logger.info(
        "refitted %s with %d weights -> %s in %.1f s",
        engine_path,
        len(keep),
        out,
        time.perf_counter() - start,
    )
    return out


# --------------------------------------------------------------------------------------------------
# LoRA variants on the tensorrt target: the caller of refit_weights / refit_engine
# --------------------------------------------------------------------------------------------------


def variant_model_name(model: str, key: str) -> str:
    """The Triton model that serves variant ``key`` of ``model`` on the tensorrt target."""
    if not VARIANT_KEY.match(key):
        raise ValueError(f"variant key {key!r} is not 16-64 lowercase hex digits")
    return f"{model}{VARIANT_SEPARATOR}{key}"


class _OnnxWeights(Mapping[str, np.ndarray]):
    """The initializers of an ONNX graph by name, converted to arrays only when asked for (TensorRT
    asks for a few weights it fused with the refitted ones, not for all of them)."""

    def __init__(self, onnx_path: Path) -> None:
        from export.models.lora import load_graph

        self._inits = {init.name: init for init in load_graph(onnx_path).model.graph.initializer}

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return np.ascontiguousarray(numpy_helper.to_array(self._inits[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._inits)

    def __len__(self) -> int:
        return len(self._inits)


def variant_refit_map(base_onnx: Path, overrides: Path, model: str) -> dict[str, np.ndarray]:
    """``{engine weight name: array}`` that turns the base engine of ``model`` into the variant whose
    merged tensors are in ``overrides`` (``<repository>/<model>/variants/<key>.safetensors``, keyed
    by the diffusers parameter names, in the base model's dtype). Runs anywhere (no TensorRT)."""
    from safetensors.torch import load_file

    from export.models.lora import ONNX_PREFIXES, onnx_state

    prefix = ONNX_PREFIXES[model]
    merged = load_file(str(overrides))
    base_state = onnx_state(base_onnx, prefix)
    # A fresh copy of the base engine holds no variant yet: previous deltas are empty.
    return refit_weights(base_state, {}, merged, prefix=prefix)


def refit_variant(repository: Path, model: str, key: str) -> Path:
    """Build the Triton model ``<model>__<key>`` of a tensorrt repository: the base engine refitted
    with the variant's overrides, and the base config under the variant's name.

    The base model directory holds ``1/model.plan`` (built refittable) and ``1/model.onnx`` (the graph
    it was built from, whose initializers are the base weights); the overrides file is written by
    the LoRA variant builder. The directory is built beside its place and renamed in whole. Needs
    TensorRT and the GPU the engine was built for (:class:`TensorRTUnavailable` otherwise).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    repository = Path(repository)
    name = variant_model_name(model, key)
    base_dir = repository / model
    overrides = base_dir / VARIANTS_DIR / f"{key}.safetensors"
    if not overrides.is_file():
        raise FileNotFoundError(f"no overrides for variant {key} of {model}: {overrides}")
    base_onnx, base_plan = base_dir / "1" / "model.onnx", base_dir / "1" / "model.plan"
    weights = variant_refit_map(base_onnx, overrides, model)
    final = repository / name
    staging = repository / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        refit_engine(base_plan, staging / "1" / "model.plan", weights, _OnnxWeights(base_onnx))
        config = text_format.Parse((base_dir / "config.pbtxt").read_text(), mc.ModelConfig())
        config.ClearField("name")  # Triton names it after its folder (linked under a prefix with MODEL_IDS)
        (staging / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
