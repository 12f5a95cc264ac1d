"""Triton python-backend model that runs an ONNX graph with onnxruntime (the ``python-onnx`` target).

The exporter copies this file into ``<repository>/<model>/1/model.py`` beside ``model.onnx``.  Triton's
dynamic batcher hands ``execute`` several requests at once; requests whose non-batch shapes agree are
concatenated along the batch axis and run as one onnxruntime call, then split back per request.
A request that fails gets its own error response; the others in the batch are answered normally.

LoRA variants: a request may carry the parameter ``lora_variant`` = K (16-64 hex digits; absent or
empty: the base model).  Variant K's overrides are ``<model>/variants/K.safetensors`` (merged tensors
keyed by parameter name, the initializer prefix in the header's ``onnx_prefix``); its session is the
base graph with those initializers given from memory at session creation, so nothing is copied on
disk.  At most ``max_lora_variants`` (config parameter, env ``MAX_LORA_VARIANTS`` overrides) variant
sessions stay open, least recently used closed first; each batch runs grouped by variant and shape.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

VARIANT_PARAMETER = "lora_variant"
_VARIANT_KEY = re.compile(r"^[0-9a-f]{16,64}$")


def session_options(params: dict[str, str]) -> ort.SessionOptions:
    """A fresh onnxruntime ``SessionOptions`` for this model (one per session: variants add to it)."""
    options = ort.SessionOptions()
    threads = int(params.get("intra_op_threads", "0") or 0) or int(os.environ.get("T2I_ORT_THREADS", "0"))
    if threads:
        options.intra_op_num_threads = threads
    return options


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        path = model_dir / args["model_version"] / params.get("onnx_file", "model.onnx")

        def new_session(options: ort.SessionOptions) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        self.session = new_session(session_options(params))
        limit = int(os.environ.get("MAX_LORA_VARIANTS") or params.get("max_lora_variants") or 4)
        self.variants = VariantSessions(
            model_dir / "variants", lambda: session_options(params), new_session, limit
        )
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

    def execute(self, requests: list) -> list:
        inputs = [self._inputs(r) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        responses: list = [None] * len(requests)
        for i, (request, feeds) in enumerate(zip(requests, inputs)):
            shapes = tuple(feeds[n].shape[1:] for n in self.input_names)
            try:
                variant = requested_variant(request.parameters())
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            groups[(variant, shapes)].append(i)
        # grouped by variant: each variant's session is opened (or found) once per batch
        for (variant, _), members in sorted(groups.items(), key=lambda item: item[0][0]):
            try:
                session = self.variants.session(variant) if variant else self.session
                outputs = self._run(session, [inputs[i] for i in members])
            except Exception as e:  # onnxruntime raises its own exception types
                error = pb_utils.TritonError(f"onnxruntime failed: {e}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            for i, result in zip(members, outputs):
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(result[n], dtype=self.output_dtypes[n]))
                    for n in self.output_names
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _inputs(self, request) -> dict[str, np.ndarray]:
        return {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}

    def _run(self, session: Any, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        sizes = [len(feeds[self.input_names[0]]) for feeds in batch]
        joined = {n: np.concatenate([feeds[n] for feeds in batch]) for n in self.input_names}
        outputs = session.run(self.output_names, joined)
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(out, bounds) for out in outputs]
        return [dict(zip(self.output_names, parts)) for parts in zip(*per_output)]


def requested_variant(parameters: str | dict) -> str:
    """The request's ``lora_variant`` ('' for the base model); a malformed value is an error."""
    values = json.loads(parameters) if isinstance(parameters, str) else parameters
    variant = (values or {}).get(VARIANT_PARAMETER, "")
    if not isinstance(variant, str) or (variant and not _VARIANT_KEY.match(variant)):
        raise ValueError(f"{VARIANT_PARAMETER} must be 16-64 lowercase hex digits")
    return variant


class VariantSessions:
    """Open variant sessions, least recently used first; at most ``limit`` of them."""

    def __init__(
        self,
        folder: Path,
        options: Callable[[], Any],
        new_session: Callable[[Any], Any],
        limit: int,
    ) -> None:
        self.folder = folder
        self.options = options
        self.new_session = new_session
        self.limit = max(1, limit)
        self.open: OrderedDict[str, tuple[Any, list]] = OrderedDict()

    def session(self, key: str) -> Any:
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key][0]
        while len(self.open) >= self.limit:
            self.open.popitem(last=False)
        session, keep = self._create(key)
        self.open[key] = (session, keep)
        return session

    def _create(self, key: str) -> tuple[Any, list]:
        from safetensors import safe_open

        file = self.folder / f"{key}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"LoRA variant {key} has no overrides for this model")
        options = self.options()
        keep: list = []  # onnxruntime uses these buffers without copying: they live as long as the session
        with safe_open(str(file), framework="np") as handle:
            prefix = (handle.metadata() or {}).get("onnx_prefix", "")
            for name in handle.keys():  # noqa: SIM118
                array = np.ascontiguousarray(handle.get_tensor(name))
                value = ort.OrtValue.ortvalue_from_numpy(array)
                keep.append((array, value))
                options.add_initializer(prefix + name, value)
        return self.new_session(options), keep
