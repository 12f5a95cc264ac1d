"""Triton python-backend model that runs an ONNX graph with onnxruntime (the ``python-onnx`` target).

The exporter copies this file into ``<repository>/<model>/1/model.py`` beside ``model.onnx``.  Triton's
dynamic batcher hands ``execute`` several requests at once; requests whose non-batch shapes agree are
concatenated along the batch axis and run as one onnxruntime call, then split back per request.
A request that fails gets its own error response; the others in the batch are answered normally.

Memory: onnxruntime's CPU arena is off, so what a large batch allocated goes back to the system
afterwards (with it on, one 1024x1024 request left the process at 2.3 GB for good).  A batch whose
latent input holds more than ``T2I_MAX_BATCH_LATENT_PIXELS`` (rows x height x width, from the
service's ``MAX_BATCH_PIXELS``; environment of tritonserver) runs in chunks of rows under that cap.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# Inputs whose rows x height x width the batch cap counts (UNet ``sample``, VAE decoder ``latent``).
_LATENT_INPUTS = ("sample", "latent")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0") or 0) or int(os.environ.get("T2I_ORT_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        options.enable_cpu_mem_arena = False  # give a large batch's memory back when it is done
        self.max_batch_pixels = int(os.environ.get("T2I_MAX_BATCH_LATENT_PIXELS", "0") or 0)
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
        outputs = self._run_chunked(self.session, joined)
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(out, bounds) for out in outputs]
        return [dict(zip(self.output_names, parts)) for parts in zip(*per_output)]

    def _run_chunked(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run`` on ``feeds``, in chunks of rows when the latent pixels exceed the cap."""
        latent = next((feeds[n] for n in _LATENT_INPUTS if n in feeds and feeds[n].ndim == 4), None)
        if latent is None or not self.max_batch_pixels:
            return session.run(self.output_names, feeds)
        rows = len(latent)
        step = max(1, self.max_batch_pixels // (latent.shape[2] * latent.shape[3]))
        if step >= rows:
            return session.run(self.output_names, feeds)
        parts = [
            session.run(self.output_names, {n: a[i : i + step] for n, a in feeds.items()})
            for i in range(0, rows, step)
        ]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(self.output_names))]
