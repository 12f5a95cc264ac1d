"""torch module -> ONNX file, and the check that the ONNX graph computes what the module computes."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.precision import FP32_TOLERANCE, Tolerance
from export.specs import ModelSpec

logger = logging.getLogger(__name__)

OPSET = 17
# |onnx - torch| <= ATOL + RTOL * max|torch| on every output element, in float32.
ATOL = FP32_TOLERANCE.atol
RTOL = FP32_TOLERANCE.rtol


class OnnxMismatchError(RuntimeError):
    """The exported graph disagrees with its torch module past the tolerance."""


def example_inputs(spec: ModelSpec, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for ``spec`` at ``sizes``: token ids, timesteps in [0, 1000), normal floats."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.concrete(sizes)
        if t.name == "input_ids" and spec.vocab_size is not None:
            # T5-style: ordinary pieces, then the end-of-sequence id 1.
            ids = rng.integers(3, spec.vocab_size, size=shape)
            ids[:, -1] = 1
            feeds[t.name] = ids.astype(t.np_dtype)
        elif t.name == "input_ids":
            ids = rng.integers(0, 49406, size=shape)
            ids[:, 0], ids[:, -1] = 49406, 49407
            feeds[t.name] = ids.astype(t.np_dtype)
        elif t.name == "timestep":
            feeds[t.name] = rng.uniform(0, 1000, size=shape).astype(t.np_dtype)
        elif t.name == "guidance":
            feeds[t.name] = rng.uniform(1, 10, size=shape).astype(t.np_dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds


def export_onnx(module: nn.Module, spec: ModelSpec, trace_sizes: dict[str, int], path: Path) -> None:
    """Trace ``module`` at ``trace_sizes`` and write ``path`` with the spec's names and dynamic axes."""
    feeds = example_inputs(spec, trace_sizes)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    dynamic_axes = {t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            # Every parameter keeps its own initializer, named after it, so LoRA variants
            # (export/lora.py) and TensorRT refits replace weights by name. Constant folding would
            # pre-transpose Linear weights into anonymous ``onnx::MatMul_*`` initializers, and the
            # deduplication pass (off only with keep_initializers_as_inputs) would let equal-valued
            # parameters share one. onnxruntime and TensorRT fold the transposes when they load.
            do_constant_folding=False,
            keep_initializers_as_inputs=True,
            dynamo=False,
        )
    _drop_initializer_inputs(path)
    logger.info("%s: ONNX written to %s in %.1f s", spec.name, path, time.perf_counter() - start)


def _drop_initializer_inputs(path: Path) -> None:
    """Remove the weights from the graph inputs that ``keep_initializers_as_inputs`` listed them in,
    so runtimes treat them as constants (and fold them) again. External data files stay as written."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        gather_external_data(model, path)
    else:
        onnx.save(model, str(path))


EXTERNAL_DATA_SUFFIX = ".data"


def gather_external_data(model: Any, path: Path) -> None:
    """Save ``model`` (read from ``path`` without its external data) to ``path`` with all its weights
    in one ``<name>.data`` file beside it.

    Graphs past protobuf's 2 GB limit (a T5-XXL encoder, a FLUX transformer) are written by the
    exporter with one external file per tensor; thousands of files in a model directory make copies
    and refits slow. Initializer names stay as they are.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    folder = path.parent
    old_files = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    load_external_data_for_model(model, str(folder))
    location = path.name + EXTERNAL_DATA_SUFFIX
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    for name in old_files - {location}:
        (folder / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class CheckResult:
    sizes: dict[str, int]
    output: str
    max_abs_error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        error = f"max |onnx - torch| = {self.max_abs_error:.3g} (allowed {self.allowed:.3g})"
        return f"{self.output} at {self.sizes}: {error} {verdict}"


OnnxRunner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def onnx_runner(path: Path, spec: ModelSpec, gpu: bool = False, device: int = 0) -> tuple[OnnxRunner, str]:
    """A runner of the graph at ``path`` and its name: onnxruntime (on CUDA too with ``gpu`` where
    onnxruntime-gpu is installed), or onnx's reference evaluator where onnxruntime's CPU provider has
    no kernel for an op at the graph's types (bf16)."""
    import onnxruntime as ort

    names = [t.name for t in spec.outputs]
    providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own NotImplemented/Fail classes
        if "NOT_IMPLEMENTED" not in str(e) and "Could not find an implementation" not in str(e):
            raise
        from onnx.reference import ReferenceEvaluator

        logger.info("%s: onnxruntime-CPU lacks a kernel (%s); using onnx's reference evaluator", path, e)
        evaluator = ReferenceEvaluator(str(path))
        return (lambda feeds: list(evaluator.run(names, feeds))), "onnx.reference"
    # What the session runs on: get_available_providers() lists CUDA whenever onnxruntime-gpu is
    # installed, even where its libraries or the driver cannot load; the session falls back to CPU then.
    running = session.get_providers()
    if gpu and running[0] != "CUDAExecutionProvider":
        logger.warning(
            "%s: onnxruntime runs on %s, not CUDA (its CUDA provider did not load)", path, *running[:1]
        )
    return (lambda feeds: list(session.run(names, feeds))), f"onnxruntime ({running[0]})"


def check_onnx(
    module: nn.Module, spec: ModelSpec, path: Path, tolerance: Tolerance = FP32_TOLERANCE
) -> list[CheckResult]:
    """Run the ONNX graph and the (float32) module on the same random inputs at each of the spec's
    check sizes; ``tolerance`` is that of the graph's precision.

    Raises :class:`OnnxMismatchError` listing every result when any output is past the tolerance.
    """
    run, runner = onnx_runner(path, spec)
    results: list[CheckResult] = []
    for i, sizes in enumerate(spec.check_sizes):
        feeds = example_inputs(spec, sizes, seed=i + 1)
        got = run(feeds)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        for t, ref, out in zip(spec.outputs, expected, got, strict=True):
            ref_np = ref.numpy()
            if ref_np.shape != out.shape:
                raise OnnxMismatchError(
                    f"{spec.name}.{t.name} at {sizes}: shape {out.shape} != torch {ref_np.shape}"
                )
            allowed = tolerance.allowed(float(np.abs(ref_np).max()))
            error = float(np.abs(ref_np - out.astype(np.float32)).max())
            results.append(CheckResult(sizes, t.name, error if np.isfinite(error) else float("inf"), allowed))
    for r in results:
        logger.info("%s (%s): %s", spec.name, runner, r)
    bad = [r for r in results if not r.ok]
    if bad:
        raise OnnxMismatchError(f"{spec.name}: ONNX graph does not match torch:\n" + "\n".join(map(str, bad)))
    return results
