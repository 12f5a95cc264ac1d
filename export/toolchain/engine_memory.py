"""GPU memory of an engine, read from its ONNX graph before TensorRT sees it.

- Weights (exact): the bytes of every initializer and ``Constant`` tensor of the graph, at the graph's
  own types, which are the engine's (an fp16 export holds fp16 weights; TensorRT's strongly typed
  network keeps each tensor's type). A refittable engine keeps all of them.
- Activations (an estimate): the peak of the bytes alive at once when the graph's nodes run one after
  another in the file's (topological) order at the profile's largest shapes, each intermediate freed
  after its last reader. TensorRT fuses layers and reuses memory, so its own figure
  (``ICudaEngine.device_memory_size``) is usually lower, and tactics may add workspace; a real build
  records TensorRT's number beside this one.

Triton's TensorRT backend makes one execution context per profile listed in the model's config, each
holding the activation memory of the engine's largest profile, so a model costs about
``weights + contexts x activations``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationEstimate:
    peak_bytes: int
    # Intermediate tensors whose shape inference could not give (counted as 0 bytes).
    unknown_tensors: int


def _load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def weight_bytes(path: Path) -> int:
    """The bytes of every initializer and ``Constant`` value of the ONNX graph at ``path`` (exact)."""
    graph = _load_graph(path).graph
    total = sum(_tensor_bytes(t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            total += sum(_tensor_bytes(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def activation_estimate(path: Path, input_shapes: Mapping[str, tuple[int, ...]]) -> ActivationEstimate:
    """Peak bytes of intermediate tensors alive at once with the graph inputs at ``input_shapes``."""
    model = _load_graph(path)
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    # Weights in the external data file are not loaded: shape inference needs their shapes only, so they
    # become graph inputs of their type and shape (its checker would look for the data file relative to
    # the working directory otherwise). Small tensors, shape constants among them, are inline.
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    kept = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for value in graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name], strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    # onnxruntime's symbolic shape inference follows the Shape -> Gather -> Concat -> Reshape chains of
    # exported graphs that onnx's own inference leaves unknown (all of the tiny UNet's 3353 tensors, against
    # 542 unknown).
    # Where it fails (it asserts on some Reshapes of bf16 graphs), onnx's own inference, with the
    # tensors it cannot size counted as unknown.
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # AssertionError, or an op it does not know
        logger.info("%s: onnxruntime's symbolic shape inference failed (%r); using onnx's", path, e)
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    sizes: dict[str, int | None] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if None in dims or not tensor_type.HasField("shape"):
            sizes[value.name] = None
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
        sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {v.name for v in graph.output}
    live: dict[str, int] = {}
    unknown: set[str] = set()

    def add(name: str) -> None:
        size = sizes.get(name)
        if size is None:
            unknown.add(name)
        live[name] = size or 0

    for value in graph.input:
        if value.name not in constants:
            add(value.name)
    peak = sum(live.values())
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name and node.op_type != "Constant":
                add(name)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= i and name not in outputs:
                del live[name]
    return ActivationEstimate(peak, len(unknown))
