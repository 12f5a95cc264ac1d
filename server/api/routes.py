"""Thin routes over the serving object and the metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
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
from server.metrics import MODEL_STATE_KEY, Metrics
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
    return await _generate(data, service, settings, request, None)


async def _generate(
    data: TextToImageParams,
    service: TextToImageService,
    settings: Settings,
    request: Request,
    model_id: str | None,
) -> ImageResponse:
    """``model_id``: the model the request's path names (None: the body's ``model_id`` chooses)."""
    service.require_prompt(data)
    require_bearer_token(request, settings)
    entry = service.model_for(data.model_id if model_id is None else model_id)
    request.scope.setdefault("state", {})[MODEL_STATE_KEY] = entry.model_id  # type: ignore[typeddict-unknown-key]
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        return await service.generate(data, client_gone=watcher.done, entry=entry)
    finally:
        watcher.cancel()


@get(["/health", "/health/"], summary="Health", operation_id="health", cache=False)
async def health(service: TextToImageService) -> HealthCheck:
    return HealthCheck(status=service.health().value)


def _version(settings: Settings, model_id: str) -> Version:
    return Version(pipeline=settings.pipeline, model_id=model_id, version=settings.version)


def _hardware_info(settings: Settings, model_id: str) -> HardwareInformation:
    devices = hardware.gpu_devices(stats=False)
    return msgspec.convert(
        {"pipeline": settings.pipeline, "model_id": model_id, "gpu_info": devices}, HardwareInformation
    )


def _hardware_stats(settings: Settings, model_id: str) -> HardwareStats:
    devices = hardware.gpu_devices(stats=True)
    return msgspec.convert(
        {"pipeline": settings.pipeline, "model_id": model_id, "gpu_stats": devices}, HardwareStats
    )


def _default_model(service: TextToImageService) -> str:
    return service.registry.default.model_id


@get("/version", summary="Version", operation_id="version")
async def version(settings: Settings, service: TextToImageService) -> Version:
    return _version(settings, _default_model(service))


@get("/hardware/info", summary="Hardware Info", operation_id="hardware_info", sync_to_thread=True)
def hardware_info(settings: Settings, service: TextToImageService) -> HardwareInformation:
    return _hardware_info(settings, _default_model(service))


@get(
    "/hardware/stats",
    summary="Hardware Stats",
    operation_id="hardware_stats",
    sync_to_thread=True,
)
def hardware_stats(settings: Settings, service: TextToImageService) -> HardwareStats:
    return _hardware_stats(settings, _default_model(service))


@get("/metrics", summary="Prometheus metrics", operation_id="metrics", media_type=MediaType.TEXT, cache=False)
async def metrics(metrics: Metrics) -> Response[bytes]:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


MODELS_PATH = "/models"


def model_path(model_id: str) -> str:
    """Where the reference runner's routes of one served model answer (several models, MODEL_IDS):
    go-livepeer's client of an ``aiModels.json`` entry whose ``url`` is this path asks its own model's
    ``/version`` and ``/hardware/*`` there, and its ``/text-to-image`` goes to that model."""
    return f"{MODELS_PATH}/{model_id.strip('/')}"


def model_router(model_id: str, retry_statuses: bool) -> Router:
    """The reference's routes (but ``/metrics``) for one model, under :func:`model_path`."""

    async def generate_for(
        data: TextToImageParams, service: TextToImageService, settings: Settings, request: Request
    ) -> ImageResponse:
        return await _generate(data, service, settings, request, model_id)

    async def version_for(settings: Settings) -> Version:
        return _version(settings, model_id)

    def info_for(settings: Settings) -> HardwareInformation:
        return _hardware_info(settings, model_id)

    def stats_for(settings: Settings) -> HardwareStats:
        return _hardware_stats(settings, model_id)

    async def health_for(service: TextToImageService) -> HealthCheck:
        return HealthCheck(status=service.health().value)

    handlers: list[BaseRouteHandler] = [
        post(
            ["/text-to-image", "/text-to-image/"],
            status_code=200,
            responses=text_to_image_responses(retry_statuses),
            security=[{BEARER: []}],
            include_in_schema=False,
        )(generate_for),
        get(["/health", "/health/"], cache=False, include_in_schema=False)(health_for),
        get("/version", include_in_schema=False)(version_for),
        get("/hardware/info", sync_to_thread=True, include_in_schema=False)(info_for),
        get("/hardware/stats", sync_to_thread=True, include_in_schema=False)(stats_for),
    ]
    return Router(path=model_path(model_id), route_handlers=handlers)


def route_handlers(settings: Settings) -> list[BaseRouteHandler | Router]:
    """The app's routes; what ``/text-to-image`` documents depends on ``HTTP_RETRY_STATUSES``.  With
    several models each also answers under its own path (:func:`model_path`)."""
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
    routes: list[BaseRouteHandler | Router] = [
        generate,
        health,
        version,
        hardware_info,
        hardware_stats,
        metrics,
    ]
    served = settings.served_models()
    if len(served) > 1:
        routes += [model_router(m.model_id, settings.http_retry_statuses) for m in served]
    return routes
