"""Triton python-backend model that runs an ONNX graph with onnxruntime (the ``python-onnx`` target).

The exporter copies this file into ``<repository>/<model>/1/model.py`` beside ``model.onnx``;
:mod:`export.triton_models.onnx_model` holds the model (sessions, LoRA variants, the batch cap, memory)
and this file only binds it to Triton.  Triton's dynamic batcher hands ``execute`` several requests at
once; requests with the same LoRA variant (request parameter ``lora_variant``, absent or empty: the base
model) and the same non-batch shapes run as one onnxruntime call, then are split back per request.  A
request that fails gets its own error response; the others in the batch are answered normally.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from export.triton_models.onnx_model import OnnxModel, requested_variant


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model = OnnxModel.load(
            Path(args["model_repository"]), args["model_version"], args["model_name"], config
        )
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

    def execute(self, requests: list) -> list:
        names = self.model.input_names
        inputs = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in names} for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        responses: list = [None] * len(requests)
        for i, (request, feeds) in enumerate(zip(requests, inputs, strict=True)):
            try:
                variant = requested_variant(request.parameters())
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            groups[(variant, tuple(feeds[n].shape[1:] for n in names))].append(i)
        # grouped by variant: each variant's session is opened (or found) once per batch
        for (variant, _), members in sorted(groups.items(), key=lambda item: item[0][0]):
            try:
                outputs = self.model.run([inputs[i] for i in members], variant)
            except Exception as e:  # onnxruntime raises its own exception types
                error = pb_utils.TritonError(f"onnxruntime failed: {e}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            for i, result in zip(members, outputs, strict=True):
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(result[n], dtype=self.output_dtypes[n]))
                    for n in self.model.output_names
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        self.model.batch_done()
        return responses
