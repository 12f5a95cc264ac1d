"""Thin routes over the serving object, the runtime and the metrics."""

from __future__ import annotations

import asyncio
import hmac

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from server import hardware
from server.api.schemas import (
    HardwareInformation,
    HardwareStats,
    HealthResponse,
    HTTPError,
    ImageResponse,
    TextToImageParams,
    Version,
)
from server.errors import Unauthorized
from server.metrics import Metrics
from server.runtime import Runtime
from server.service import TextToImageService
from server.settings import Settings

ERROR_RESPONSES = {
    code: ResponseSpec(data_container=HTTPError, description=description)
    for code, description in (
        (400, "Bad request: a rule of the API is broken"),
        (401, "Missing or wrong bearer token"),
        (413, "The request body is over the service's MAX_BODY_BYTES"),
        (422, "The body does not decode into the request schema (malformed JSON, a wrong type, a length)"),
        (500, "Inference failed (including out of GPU memory)"),
        (503, "The service cannot take the request now (loading, busy, Triton unavailable, deadline)"),
    )
}


def require_bearer_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """With ``AUTH_TOKEN`` set, the request must carry it as a bearer token (compared in constant time)."""
    settings: Settings = connection.app.state.settings
    if not settings.auth_token:
        return
    scheme, _sep, token = connection.headers.get("authorization", "").partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.auth_token.encode()
    )
    if not valid:
        raise Unauthorized()


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read already, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@post(
    ["/text-to-image", "/text-to-image/"],
    status_code=200,
    guards=[require_bearer_token],
    responses=ERROR_RESPONSES,
    summary="Generate images from a text prompt",
    operation_id="text_to_image",
)
async def text_to_image(
    data: TextToImageParams, service: TextToImageService, request: Request
) -> ImageResponse:
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        return await service.generate(data, client_gone=watcher.done)
    finally:
        watcher.cancel()


@get("/health", summary="Runner health", operation_id="health", cache=False)
async def health(runtime: Runtime) -> HealthResponse:
    return HealthResponse(status=runtime.status.value)


@get("/version", summary="Pipeline, model and service version", operation_id="version")
async def version(settings: Settings) -> Version:
    return Version(pipeline=settings.pipeline, model_id=settings.model_id, version=settings.version)


@get("/hardware/info", summary="GPUs (empty without GPUs)", operation_id="hardware_info", sync_to_thread=True)
def hardware_info(settings: Settings) -> HardwareInformation:
    devices = hardware.gpu_devices(stats=False)
    return msgspec.convert(
        {"pipeline": settings.pipeline, "model_id": settings.model_id, "gpu_info": devices},
        HardwareInformation,
    )


@get(
    "/hardware/stats",
    summary="GPU utilisation (empty without GPUs)",
    operation_id="hardware_stats",
    sync_to_thread=True,
)
def hardware_stats(settings: Settings) -> HardwareStats:
    devices = hardware.gpu_devices(stats=True)
    return msgspec.convert(
        {"pipeline": settings.pipeline, "model_id": settings.model_id, "gpu_stats": devices}, HardwareStats
    )


@get("/metrics", summary="Prometheus metrics", operation_id="metrics", media_type=MediaType.TEXT, cache=False)
async def metrics(metrics: Metrics) -> Response[bytes]:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


ROUTES = [text_to_image, health, version, hardware_info, hardware_stats, metrics]
