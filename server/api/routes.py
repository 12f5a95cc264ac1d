"""Thin routes over the serving object."""

from __future__ import annotations

import hmac

from litestar import get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from server.api.schemas import HealthResponse, HTTPError, ImageResponse, TextToImageParams
from server.errors import Unauthorized
from server.runtime import Runtime
from server.service import TextToImageService
from server.settings import Settings

ERROR_RESPONSES = {
    code: ResponseSpec(data_container=HTTPError, description=description)
    for code, description in (
        (400, "Bad request: a rule of the API is broken"),
        (401, "Missing or wrong bearer token"),
        (422, "The body does not decode into the request schema"),
        (500, "Inference failed"),
        (503, "The service cannot take the request now (loading, Triton unavailable)"),
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


@post(
    ["/text-to-image", "/text-to-image/"],
    status_code=200,
    guards=[require_bearer_token],
    responses=ERROR_RESPONSES,
    summary="Generate images from a text prompt",
    operation_id="text_to_image",
)
async def text_to_image(data: TextToImageParams, service: TextToImageService) -> ImageResponse:
    return await service.generate(data)


@get("/health", summary="Runner health", operation_id="health", cache=False)
async def health(runtime: Runtime) -> HealthResponse:
    return HealthResponse(status=runtime.status.value)


ROUTES = [text_to_image, health]
