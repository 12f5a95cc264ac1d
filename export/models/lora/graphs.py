"""ONNX graphs with merged initializers: :func:`write_merged_onnx` puts merged parameters into a copy of
the exported graph (:func:`initializer_map` names the initializers; :func:`onnx_state` reads the base
state out of the graph itself). This needs initializers named after the torch parameters, which
:func:`export.toolchain.onnx_export.export_onnx` keeps (no constant folding, no deduplication).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx
    import torch

logger = logging.getLogger(__name__)


class OnnxWeightsError(RuntimeError):
    """The ONNX graph cannot take merged weights (not the LoRA's fault: an export problem)."""


def initializer_map(onnx_path: Path, module_prefix: str) -> dict[str, str]:
    """``{torch parameter name: ONNX initializer name}`` for initializers named ``module_prefix + param``.

    ``module_prefix`` is where the model sits in the exported wrapper (:data:`ONNX_PREFIXES`).
    Reads only the graph, not external weight files.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {
        init.name.removeprefix(module_prefix): init.name
        for init in model.graph.initializer
        if init.name.startswith(module_prefix)
    }


@dataclass
class OnnxGraph:
    """An exported graph with its weights in memory (external data included), read once and shared
    by :func:`onnx_state` and :func:`write_merged_onnx`."""

    path: Path
    model: onnx.ModelProto
    external: bool  # whether the file keeps its weights in external data


def load_graph(path: Path) -> OnnxGraph:
    import onnx
    from onnx import external_data_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    external = any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    if external:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    return OnnxGraph(path, model, external)


def onnx_state(graph: Path | OnnxGraph, module_prefix: str) -> dict[str, torch.Tensor]:
    """The model's parameters as the exported graph stores them: ``{torch parameter name: tensor}``.

    The base state for :func:`merge_deltas` when only the model repository is at hand (the service
    holds no torch weights). ``module_prefix`` as in :func:`initializer_map`; external data is read.
    """
    import torch
    from onnx import numpy_helper

    graph = graph if isinstance(graph, OnnxGraph) else load_graph(graph)
    return {
        init.name.removeprefix(module_prefix): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in graph.model.graph.initializer
        if init.name.startswith(module_prefix)
    }


def write_merged_onnx(
    base_onnx: Path | OnnxGraph, deltas: Mapping[str, torch.Tensor], out: Path, prefix: str
) -> Path:
    """Copy ``base_onnx`` to ``out`` with the initializers of ``deltas`` (``{param: merged weight}``)
    replaced; every other byte of the graph stays as it is.  A loaded :class:`OnnxGraph` is changed
    in place (load it again to reuse the base).

    A base stored with external data (models over 2 GB) is written the same way, to one
    ``<out name>.data`` file beside ``out``. Raises :class:`OnnxWeightsError` if a parameter has no
    initializer of its own (e.g. a graph exported with constant folding) or its shape differs.
    """
    import onnx
    from onnx import numpy_helper

    graph = base_onnx if isinstance(base_onnx, OnnxGraph) else load_graph(base_onnx)
    base_onnx, model, external, out = graph.path, graph.model, graph.external, Path(out)
    by_name = {init.name: i for i, init in enumerate(model.graph.initializer)}
    missing = [p for p in deltas if f"{prefix}{p}" not in by_name]
    if missing:
        raise OnnxWeightsError(
            f"{base_onnx} has no initializer for {len(missing)} merged parameter(s), e.g. "
            f"'{prefix}{missing[0]}'; the graph must be exported with named initializers "
            "(export_onnx without constant folding, EXPORT_VERSION >= 2)"
        )
    for param, value in deltas.items():
        index = by_name[f"{prefix}{param}"]
        old = model.graph.initializer[index]
        array = value.detach().cpu().numpy()
        if tuple(old.dims) != array.shape:
            raise OnnxWeightsError(
                f"{base_onnx}: initializer '{old.name}' has shape {list(old.dims)}, merged '{param}' "
                f"has {list(array.shape)}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(dtype), old.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(model, out, external)
    logger.info("wrote %s with %d merged initializers", out, len(deltas))
    return out


def _save(model: onnx.ModelProto, out: Path, external: bool) -> None:
    import onnx

    if not external:
        onnx.save(model, str(out))
        return
    data = out.with_name(f"{out.name}.data")
    # onnx appends to an existing data file: start from an empty one.
    data.unlink(missing_ok=True)
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
