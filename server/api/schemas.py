"""Wire types: msgspec Structs.  Field names, types and defaults are Livepeer's text-to-image API."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Lengths in characters.  CLIP keeps 77 tokens and T5 at most 512, far below the prompt bound; a
# model id is a Hub id or a local folder; ``loras`` holds MAX_LORAS ids of at most 200 bytes each.
MAX_PROMPT_CHARS = 8192
MAX_MODEL_ID_CHARS = 1024
MAX_LORAS_CHARS = 8192

Prompt = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]


class TextToImageParams(msgspec.Struct, kw_only=True):
    """Body of ``POST /text-to-image``.  Types and lengths are checked on decode (422); rules on use (400)."""

    prompt: Prompt = msgspec.field()
    model_id: Annotated[str, msgspec.Meta(max_length=MAX_MODEL_ID_CHARS)] = ""
    loras: Annotated[str, msgspec.Meta(max_length=MAX_LORAS_CHARS)] = ""
    height: int = 576
    width: int = 1024
    guidance_scale: float = 7.5
    negative_prompt: Prompt = ""
    safety_check: bool = True
    seed: int | None = None
    num_inference_steps: int = 50
    num_images_per_prompt: int = 1


class Media(msgspec.Struct):
    url: str
    seed: int
    nsfw: bool


class ImageResponse(msgspec.Struct):
    images: list[Media]


class HealthResponse(msgspec.Struct):
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


class ErrorDetail(msgspec.Struct):
    msg: str


class HTTPError(msgspec.Struct):
    """Every error body: ``{"detail": {"msg": "..."}}``."""

    detail: ErrorDetail
