"""Triton python-backend model that runs an ONNX graph with onnxruntime (the ``python-onnx`` target).

The exporter copies this file into ``<repository>/<model>/1/model.py`` beside ``model.onnx``.  Triton's
dynamic batcher hands ``execute`` several requests at once; requests whose non-batch shapes agree are
concatenated along the batch axis and run as one onnxruntime call, then split back per request.
A request that fails gets its own error response; the others in the batch are answered normally.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0") or 0) or int(os.environ.get("T2I_ORT_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        # Idle intra-op threads spin by default; beside the other models' workers, Triton and the
        # service on a few cores that spinning takes the CPU the next step's work needs.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", params.get("allow_spinning", "0") or "0"
        )
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

    def execute(self, requests: list) -> list:
        inputs = [self._inputs(r) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, feeds in enumerate(inputs):
            groups[tuple(feeds[n].shape[1:] for n in self.input_names)].append(i)
        responses: list = [None] * len(requests)
        for members in groups.values():
            try:
                outputs = self._run([inputs[i] for i in members])
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

    def _run(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        sizes = [len(feeds[self.input_names[0]]) for feeds in batch]
        joined = {n: np.concatenate([feeds[n] for feeds in batch]) for n in self.input_names}
        outputs = self.session.run(self.output_names, joined)
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(out, bounds) for out in outputs]
        return [dict(zip(self.output_names, parts)) for parts in zip(*per_output)]
