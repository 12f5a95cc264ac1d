"""torch module -> ONNX file, and the check that the ONNX graph computes what the module computes."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.contract.specs import ModelSpec
from export.models.precision import FP32_TOLERANCE, Tolerance

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
    """Trace ``module`` at ``trace_sizes`` and write ``path`` with the spec's names and dynamic axes.

    The graph is traced without its weights (``export_params=False``: the parameters stay graph inputs
    named after them); each weight is then written straight from its torch tensor into one
    ``<name>.data`` file beside the graph (:func:`attach_weights`), so the export holds no second copy
    of the model (the exporter otherwise builds the whole protobuf, weights included, in memory) and
    graphs of every size have the same layout.
    """
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
            export_params=False,
            # Every parameter keeps its own initializer, named after it, so LoRA variants
            # (export/models/lora/) and TensorRT refits replace weights by name. Constant folding would
            # pre-transpose Linear weights into anonymous ``onnx::MatMul_*`` initializers, and the
            # deduplication pass (off only with keep_initializers_as_inputs) would let equal-valued
            # parameters share one. onnxruntime and TensorRT fold the transposes when they load.
            do_constant_folding=False,
            keep_initializers_as_inputs=True,
            dynamo=False,
        )
    attach_weights(path, module.state_dict(keep_vars=True), {t.name for t in spec.inputs})
    logger.info("%s: ONNX written to %s in %.1f s", spec.name, path, time.perf_counter() - start)


EXTERNAL_DATA_SUFFIX = ".data"
# Tensors below this many bytes stay inside the graph (as onnx.save_model's size_threshold does); the
# others start at a multiple of the alignment in the data file (memory-mappable by runtimes).
_INLINE_BYTES = 1024
_ALIGNMENT = 4096


def attach_weights(path: Path, state: Mapping[str, torch.Tensor], data_inputs: set[str]) -> None:
    """Turn the weight inputs of the graph at ``path`` (every input not in ``data_inputs``) into
    initializers with the values of ``state`` (the module's ``state_dict``), written one tensor at a
    time into ``<name>.data`` beside the graph.  Raises ``KeyError`` for an input ``state`` lacks."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    location = path.name + EXTERNAL_DATA_SUFFIX
    weights = [i for i in model.graph.input if i.name not in data_inputs]
    missing = [i.name for i in weights if i.name not in state]
    if missing:
        raise KeyError(f"{path}: graph inputs {missing[:5]} are neither spec inputs nor module weights")
    offset = 0
    with (path.parent / location).open("wb") as data:
        for value in weights:
            tensor = state[value.name].detach()
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            raw = _tensor_bytes(tensor)
            proto = onnx.TensorProto(name=value.name, data_type=_ONNX_TYPES[tensor.dtype], dims=tensor.shape)
            if len(raw) < _INLINE_BYTES:
                proto.raw_data = bytes(raw)
            else:
                offset = -(-offset // _ALIGNMENT) * _ALIGNMENT
                data.seek(offset)
                data.write(raw)
                proto.data_location = onnx.TensorProto.EXTERNAL
                for key, entry in (("location", location), ("offset", offset), ("length", len(raw))):
                    proto.external_data.add(key=key, value=str(entry))
                offset += len(raw)
            model.graph.initializer.append(proto)
            del raw, tensor
    inputs = [i for i in model.graph.input if i.name in data_inputs]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (bf16 as int16: numpy has no bf16)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    if tensor.dtype == torch.bool:
        tensor = tensor.view(torch.uint8)
    array: Any = tensor.reshape(-1).numpy()
    return memoryview(array).cast("B")


_ONNX_TYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.uint8: 2,
    torch.int8: 3,
    torch.int16: 5,
    torch.int32: 6,
    torch.int64: 7,
    torch.bool: 9,
    torch.float16: 10,
    torch.float64: 11,
    torch.bfloat16: 16,
}


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


def onnx_runner(
    path: Path, spec: ModelSpec, gpu: bool = False, device: int = 0, optimize: bool = True
) -> tuple[OnnxRunner, str]:
    """A runner of the graph at ``path`` and its name: onnxruntime (on CUDA too with ``gpu`` where
    onnxruntime-gpu is installed), or onnx's reference evaluator where onnxruntime's CPU provider has
    no kernel for an op at the graph's types (bf16).

    ``optimize=False`` runs the graph as written, without the CPU memory arena: onnxruntime's constant
    folding would otherwise store a float32 copy of every fp16 weight that feeds a node its CPU provider
    runs in float32 (the casts it inserts), and a transposed copy of each Linear weight, and its arena
    would keep every such copy made during a run, so the session would hold up to three times the fp16
    weights; this way the weights stay in their memory-mapped data file and each cast or transpose
    lives for one node (measured: 4 fp16 MatMul weights of 128 MB, 1609 MB after a run with the arena,
    521 MB without, 1033 MB with constant folding). It also runs the nodes in onnxruntime's
    priority-based order: in its default order a Cast of a weight, which depends on nothing the run
    computes, may run long before the node that reads its float32 copy, so many such copies are live at
    once (measured on the full-size SD 1.5 fp16 UNet, 1.6 GiB of weights, two check runs: the session
    peaks at 3.06 GiB in the default order, 2.49 GiB in the priority-based one; bench/RESULTS.md)."""
    import onnxruntime as ort

    names = [t.name for t in spec.outputs]
    providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
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


@dataclass(frozen=True)
class Reference:
    """The module's outputs on the check inputs at one of the spec's check sizes."""

    sizes: dict[str, int]
    feeds: dict[str, np.ndarray]
    outputs: tuple[np.ndarray, ...]


def reference_outputs(module: nn.Module, spec: ModelSpec) -> list[Reference]:
    """Run ``module`` on the random check inputs at each of the spec's check sizes (seeds 1, 2, ...).

    Computed before the export, so the check's onnxruntime session never holds the weights beside
    torch's: the module can be freed first."""
    references = []
    for i, sizes in enumerate(spec.check_sizes):
        feeds = example_inputs(spec, sizes, seed=i + 1)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        references.append(Reference(sizes, feeds, tuple(e.float().numpy() for e in expected)))
    return references


def compare_onnx(
    path: Path, spec: ModelSpec, references: list[Reference], tolerance: Tolerance = FP32_TOLERANCE
) -> list[CheckResult]:
    """Run the ONNX graph at ``path`` on each reference's inputs; ``tolerance`` is that of the graph's
    precision.  Raises :class:`OnnxMismatchError` listing every result when any output is past it."""
    run, runner = onnx_runner(path, spec, optimize=False)
    results: list[CheckResult] = []
    for reference in references:
        sizes = reference.sizes
        got = run(reference.feeds)
        for t, ref_np, out in zip(spec.outputs, reference.outputs, got, strict=True):
            if ref_np.shape != out.shape:
                raise OnnxMismatchError(
                    f"{spec.name}.{t.name} at {sizes}: shape {out.shape} != torch {ref_np.shape}"
                )
            allowed = tolerance.allowed(float(np.abs(ref_np).max()))
            error = float(np.abs(ref_np - out.astype(np.float32)).max())
            results.append(CheckResult(sizes, t.name, error if np.isfinite(error) else float("inf"), allowed))
    del run
    for r in results:
        logger.info("%s (%s): %s", spec.name, runner, r)
    bad = [r for r in results if not r.ok]
    if bad:
        raise OnnxMismatchError(f"{spec.name}: ONNX graph does not match torch:\n" + "\n".join(map(str, bad)))
    return results


def check_onnx(
    module: nn.Module, spec: ModelSpec, path: Path, tolerance: Tolerance = FP32_TOLERANCE
) -> list[CheckResult]:
    """Run the ONNX graph and the (float32) module on the same random inputs at each of the spec's
    check sizes; ``tolerance`` is that of the graph's precision.

    Raises :class:`OnnxMismatchError` listing every result when any output is past the tolerance.
    """
    return compare_onnx(path, spec, reference_outputs(module, spec), tolerance)
