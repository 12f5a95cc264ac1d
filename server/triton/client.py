"""The engine client: inference on Triton over the async gRPC client, errors translated at this edge."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.errors import (
    InferenceFailed,
    ModelUnavailable,
    OutOfMemory,
    ServiceError,
    ServiceUnavailable,
    TritonUnavailable,
)
from server.triton.oom import is_out_of_memory

logger = logging.getLogger(__name__)

# gRPC status codes as tritonclient reports them (InferenceServerException.status()).
UNAVAILABLE = "StatusCode.UNAVAILABLE"  # nothing answers (or the server is shutting down)
NOT_FOUND = "StatusCode.NOT_FOUND"  # "Request for unknown model": not loaded, or no ready version
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
CANCELLED = "StatusCode.CANCELLED"
INTERNAL = "StatusCode.INTERNAL"
# The python backend's answer (INTERNAL) once the model's stub process has died; Triton still calls
# the model ready, and it stays broken until it is loaded again.
_DEAD_STUB = re.compile(r"Stub process '[^']*' is not healthy")


def triton_inputs(inputs: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """gRPC inputs of one request; a 1-D array is sent as [batch, 1] (Triton's shape for per-row
    scalars; the model config reshapes it back to [batch])."""
    infer_inputs = []
    for name, array in inputs.items():
        data = np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array)
        tensor = grpcclient.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
        tensor.set_data_from_numpy(data)
        infer_inputs.append(tensor)
    return infer_inputs


class TritonClient:
    """Async inference against one Triton server.  Arrays in, arrays out; batch axis first."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url=url)
        self._max_batch: dict[str, int] = {}
        self._backend: dict[str, str] = {}

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
            raise await self._translate(name, e) from e

    async def unload_model(self, name: str) -> None:
        try:
            await self._client.unload_model(name, client_timeout=30)
        except InferenceServerException as e:
            raise await self._translate(name, e) from e
        self._max_batch.pop(name, None)
        self._backend.pop(name, None)

    async def max_batch_size(self, name: str) -> int:
        if name not in self._max_batch:
            config = await self._config(name)
            self._max_batch[name] = int(config.get("max_batch_size", 0))
        return self._max_batch[name]

    async def backend(self, name: str) -> str:
        """The backend that runs ``name`` ("python" for the python-onnx / python-torch targets)."""
        if name not in self._backend:
            config = await self._config(name)
            self._backend[name] = str(config.get("backend") or config.get("platform") or "")
        return self._backend[name]

    async def _config(self, name: str) -> dict:  # type: ignore[type-arg]
        try:
            config = await self._client.get_model_config(name, as_json=True, client_timeout=10)
        except InferenceServerException as e:
            raise await self._translate(name, e) from e
        return dict(config["config"])

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One request: ``inputs`` share their batch axis (sent as :func:`triton_inputs` makes them).
        ``parameters`` are the request's parameters (e.g. ``lora_variant``)."""
        infer_inputs = triton_inputs(inputs)
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
            raise await self._translate(model, e) from e
        # as_numpy views the response buffer read-only; callers (torch) need arrays they own
        return {name: np.array(result.as_numpy(name)) for name in outputs}

    async def _translate(self, model: str, e: InferenceServerException) -> ServiceError:
        """The service's error for a failed call on ``model``, from the gRPC status code.

        UNAVAILABLE is the server gone only when the server is not live any more; a live server that
        answers UNAVAILABLE does not serve the model now.  Only ``TritonUnavailable`` means Triton is
        gone; ``ModelUnavailable`` names the model; deadlines and cancellations concern one call.
        """
        status = str(e.status() or "")
        text = str(e.message() or e)
        logger.warning("Triton %s failed: %s %s", model, status or "(no status)", text)
        if status == UNAVAILABLE and not await self.is_live():
            return TritonUnavailable(
                f"Triton Inference Server at {self.url} is unavailable; try again shortly."
            )
        return classify(model, status, text, self.timeout_s)


def classify(model: str, status: str, text: str, timeout_s: float) -> ServiceError:
    """The service's error for a call on ``model`` that a live server failed with ``status``."""
    if status in (UNAVAILABLE, NOT_FOUND):
        return ModelUnavailable(f"Model '{model}' is not loaded in Triton; try again shortly.", model)
    if status == DEADLINE_EXCEEDED:
        return ServiceUnavailable(
            f"Model '{model}' did not answer within {timeout_s:g} s; try again shortly."
        )
    if status == CANCELLED:
        return ServiceUnavailable(f"The call to model '{model}' was cancelled; try again shortly.")
    if status == INTERNAL and _DEAD_STUB.search(text):
        return ModelUnavailable(
            f"Model '{model}' lost its worker process and is being reloaded; try again shortly.",
            model,
            worker_dead=True,
        )
    if is_out_of_memory(text):
        return OutOfMemory()
    return InferenceFailed(f"Inference failed in model '{model}'.")
