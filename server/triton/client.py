"""The engine client: inference on Triton over the async gRPC client, errors translated at this edge."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.errors import InferenceFailed, OutOfMemory, ServiceUnavailable
from server.triton.oom import is_out_of_memory

logger = logging.getLogger(__name__)

_UNAVAILABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED")


class TritonClient:
    """Async inference against one Triton server.  Arrays in, arrays out; batch axis first."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url=url)
        self._max_batch: dict[str, int] = {}

    async def close(self) -> None:
        await self._client.close()

    async def is_live(self) -> bool:
        """Whether the server answers.  (Its *readiness* drops while any model loads, e.g. a LoRA
        variant, so the service checks the models it uses one by one instead.)"""
        try:
            return bool(await self._client.is_server_live(client_timeout=5))
        except InferenceServerException:
            return False

    async def model_ready(self, name: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(name, client_timeout=5))
        except InferenceServerException:
            return False

    async def load_model(self, name: str) -> None:
        """Load (or reload) ``name`` from the repository; needs Triton's explicit model control."""
        try:
            await self._client.load_model(name, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise _translate(name, e) from e

    async def unload_model(self, name: str) -> None:
        try:
            await self._client.unload_model(name, client_timeout=30)
        except InferenceServerException as e:
            raise _translate(name, e) from e
        self._max_batch.pop(name, None)

    async def max_batch_size(self, name: str) -> int:
        if name not in self._max_batch:
            try:
                config = await self._client.get_model_config(name, as_json=True, client_timeout=10)
            except InferenceServerException as e:
                raise _translate(name, e) from e
            self._max_batch[name] = int(config["config"].get("max_batch_size", 0))
        return self._max_batch[name]

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One request: ``inputs`` share their batch axis.  A 1-D input is sent as [batch, 1]
        (Triton's shape for per-row scalars; the model config reshapes it back to [batch]).
        ``parameters`` are the request's parameters (e.g. ``lora_variant``)."""
        infer_inputs = []
        for name, array in inputs.items():
            data = np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array)
            tensor = grpcclient.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
            tensor.set_data_from_numpy(data)
            infer_inputs.append(tensor)
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        try:
            result = await self._client.infer(
                model,
                infer_inputs,
                outputs=requested,
                client_timeout=self.timeout_s,
                parameters=dict(parameters) if parameters else None,
            )
        except InferenceServerException as e:
            raise _translate(model, e) from e
        # as_numpy views the response buffer read-only; callers (torch) need arrays they own
        return {name: np.array(result.as_numpy(name)) for name in outputs}


def _translate(model: str, e: InferenceServerException) -> Exception:
    text = str(e.message() or e)
    status = str(e.status() or "")
    logger.warning("Triton %s failed: %s %s", model, status, text)
    if is_out_of_memory(text):
        return OutOfMemory()
    if status in _UNAVAILABLE or "failed to connect" in text.lower() or "unavailable" in text.lower():
        return ServiceUnavailable("Triton Inference Server is unavailable; try again shortly.")
    if "is not ready" in text or "unknown model" in text.lower() or "unavailable model" in text.lower():
        return ServiceUnavailable(f"Model '{model}' is not loaded in Triton; try again shortly.")
    return InferenceFailed(f"Inference failed in model '{model}'.")
