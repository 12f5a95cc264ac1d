"""Thin routes over the serving object and the metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme

from server import hardware
from server.api.schemas import (
    HardwareInformation,
    HardwareStats,
    HealthCheck,
    HTTPError,
    HTTPValidationError,
    ImageResponse,
    TextToImageParams,
    Version,
)
from server.errors import Unauthorized
from server.metrics import Metrics
from server.service import TextToImageService
from server.settings import Settings

# The reference runner's OpenAPI document, for the operations it has: the same operation ids, bearer
# scheme, component names and documented statuses, so a client generated from either is the same.
BEARER = "HTTPBearer"
SECURITY_COMPONENTS = Components(security_schemes={BEARER: SecurityScheme(type="http", scheme="bearer")})


def text_to_image_responses(retry_statuses: bool) -> dict[int, ResponseSpec]:
    """The documented answers of ``/text-to-image``: the reference's, plus 413 and 503 where
    ``HTTP_RETRY_STATUSES`` gives them."""
    documented: list[tuple[int, Any, str]] = [
        (400, HTTPError, "Bad Request"),
        (401, HTTPError, "Unauthorized"),
        (422, HTTPValidationError, "Validation Error"),
        (500, HTTPError, "Internal Server Error"),
    ]
    if retry_statuses:
        documented += [
            (413, HTTPError, "Request body over MAX_BODY_BYTES"),
            (503, HTTPError, "The service cannot serve the request now; retry after Retry-After seconds"),
        ]
    return {code: ResponseSpec(data_container=data, description=text) for code, data, text in documented}


def require_bearer_token(request: Request, settings: Settings) -> None:
    """With ``AUTH_TOKEN`` set, the request must carry it as a bearer token (compared in constant time)."""
    if not settings.auth_token:
        return
    scheme, _sep, token = request.headers.get("authorization", "").partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.auth_token.encode()
    )
    if not valid:
        raise Unauthorized()


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read already, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def text_to_image(
    data: TextToImageParams, service: TextToImageService, settings: Settings, request: Request
) -> ImageResponse:
    """Checked in the reference's order: the body (422), the prompt (400), the token (401), the rest."""
    service.require_prompt(data)
    require_bearer_token(request, settings)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        return await service.generate(data, client_gone=watcher.done)
    finally:
        watcher.cancel()


@get(["/health", "/health/"], summary="Health", operation_id="health", cache=False)
async def health(service: TextToImageService) -> HealthCheck:
    return HealthCheck(status=service.health().value)


@get("/version", summary="Version", operation_id="version")
async def version(settings: Settings) -> Version:
    return Version(pipeline=settings.pipeline, model_id=settings.model_id, version=settings.version)


@get("/hardware/info", summary="Hardware Info", operation_id="hardware_info", sync_to_thread=True)
def hardware_info(settings: Settings) -> HardwareInformation:
    devices = hardware.gpu_devices(stats=False)
    return msgspec.convert(
        {"pipeline": settings.pipeline, "model_id": settings.model_id, "gpu_info": devices},
        HardwareInformation,
    )


@get(
    "/hardware/stats",
    summary="Hardware Stats",
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


def route_handlers(settings: Settings) -> list[BaseRouteHandler]:
    """The app's routes; what ``/text-to-image`` documents depends on ``HTTP_RETRY_STATUSES``."""
    generate = post(
        ["/text-to-image", "/text-to-image/"],
        status_code=200,
        responses=text_to_image_responses(settings.http_retry_statuses),
        summary="Text To Image",
        description="Generate images from text prompts.",
        operation_id="genTextToImage",
        tags=["generate"],
        security=[{BEARER: []}],
    )(text_to_image)
    return [generate, health, version, hardware_info, hardware_stats, metrics]
