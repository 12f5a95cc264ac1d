"""Triton python-backend model that runs a diffusers module with torch (the ``python-torch`` target).

The exporter copies this file into ``<repository>/<model>/1/model.py`` beside ``torch_module.json`` and
the module's weights (``source/``); :mod:`export.triton_models.torch_model` rebuilds the module and runs
it, so Triton's Python needs torch, diffusers, transformers and this project's ``export`` package.

Triton's dynamic batcher hands ``execute`` several requests at once; requests with the same LoRA
variant (request parameter ``lora_variant``, absent or empty: the base model) and the same non-batch
shapes run as one forward pass.  Tensors come in and go out through DLPack (no copy on the way out;
on the way in only the concatenation and the move to the model's device).  A request that fails gets
its own error response; the others in the batch are answered normally.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from export.contract.specs import VARIANT_PARAMETER
from export.triton_models.torch_model import TorchModel, TorchOptions
from export.triton_models.torch_variants import VariantError


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        self.model = TorchModel.load(
            Path(args["model_repository"]),
            args["model_version"],
            device,
            TorchOptions.from_parameters(params),
        )
        self.device = device

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        inputs: list[dict[str, torch.Tensor]] = []
        for i, request in enumerate(requests):
            try:
                feeds = self._inputs(request)
                variant = _variant(request)
            except (ValueError, TypeError) as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                inputs.append({})
                continue
            inputs.append(feeds)
            groups[(variant, *(tuple(feeds[n].shape[1:]) for n in self.model.input_names))].append(i)
        # Same variant next to each other, so each one's weights are swapped in once per batch.
        for key in sorted(groups, key=lambda k: k[0]):
            members = groups[key]
            try:
                outputs = self.model.run([inputs[i] for i in members], variant=key[0])
            except VariantError as e:
                error = pb_utils.TritonError(str(e))
                outputs = None
            except Exception as e:  # torch raises many types (CUDA out of memory included)
                error = pb_utils.TritonError(f"torch failed: {e}")
                outputs = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            for n, i in enumerate(members):
                if outputs is None:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                else:
                    tensors = [pb_utils.Tensor.from_dlpack(name, t) for name, t in outputs[n].items()]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _inputs(self, request) -> dict[str, torch.Tensor]:
        feeds = {}
        for name in self.model.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input '{name}'")
            feeds[name] = torch.from_dlpack(tensor.to_dlpack())
        return feeds


def _variant(request) -> str:
    raw = request.parameters()
    params = json.loads(raw) if raw else {}
    value = params.get(VARIANT_PARAMETER, "")
    if not isinstance(value, str):
        raise TypeError(f"request parameter {VARIANT_PARAMETER} must be a string")
    return value
