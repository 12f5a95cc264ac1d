"""Wire types: msgspec Structs.  Field names, types and defaults are Livepeer's text-to-image API."""

from __future__ import annotations

from typing import Literal

import msgspec


class TextToImageParams(msgspec.Struct, kw_only=True):
    """Body of ``POST /text-to-image``.  Types are checked on decode (422), rules on use (400).  No
    field has a length of its own, as in the reference: MAX_BODY_BYTES bounds them all, and only the
    prefix of a prompt that the tokenizers keep is read (:func:`server.pipeline.model.tokenize_truncated`)."""

    prompt: str = msgspec.field()
    model_id: str = ""
    loras: str = ""
    height: int = 576
    width: int = 1024
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    safety_check: bool = True
    # absent: a random seed; null is a 422 as in the reference (an integer without a default there)
    seed: int | msgspec.UnsetType = msgspec.UNSET
    num_inference_steps: int = 50
    num_images_per_prompt: int = 1


class Media(msgspec.Struct):
    url: str
    seed: int
    nsfw: bool


class ImageResponse(msgspec.Struct):
    images: list[Media]


class HealthCheck(msgspec.Struct):
    status: Literal["LOADING", "OK", "ERROR", "IDLE"]


class Version(msgspec.Struct):
    pipeline: str
    model_id: str
    version: str


class GPUComputeInfo(msgspec.Struct):
    id: str
    name: str
    memory_total: int
    memory_free: int
    major: int
    minor: int


class GPUUtilizationInfo(msgspec.Struct):
    id: str
    name: str
    memory_total: int
    memory_free: int
    utilization_compute: int
    utilization_memory: int


class HardwareInformation(msgspec.Struct):
    pipeline: str
    model_id: str
    gpu_info: dict[int, GPUComputeInfo]


class HardwareStats(msgspec.Struct):
    pipeline: str
    model_id: str
    gpu_stats: dict[int, GPUUtilizationInfo]


# The reference's error bodies (its OpenAPI components, so generated clients parse them).
class APIError(msgspec.Struct):
    msg: str


class HTTPError(msgspec.Struct):
    """400, 401 and 500 (and 503 / 413 where HTTP_RETRY_STATUSES is on): ``{"detail": {"msg": "..."}}``."""

    detail: APIError


class ValidationError(msgspec.Struct):
    """One problem of a body, as FastAPI (pydantic 2) names it: ``loc`` ``["body", "<field>"]``."""

    loc: list[str | int]
    msg: str
    type: str


class HTTPValidationError(msgspec.Struct):
    """422: FastAPI's ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``."""

    detail: list[ValidationError] = msgspec.field(default_factory=list)  # optional there too
