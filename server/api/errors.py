"""Every error becomes ``{"detail": {"msg": "..."}}`` here, and only here."""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_422_UNPROCESSABLE_ENTITY, HTTP_500_INTERNAL_SERVER_ERROR

from server.api.schemas import ErrorDetail, HTTPError
from server.errors import ServiceError, ServiceUnavailable, Unauthorized

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "5"


def error_response(status_code: int, msg: str, headers: dict[str, str] | None = None) -> Response[HTTPError]:
    return Response(
        HTTPError(detail=ErrorDetail(msg=msg)),
        status_code=status_code,
        headers=headers,
        media_type=MediaType.JSON,
    )


def service_error(_: Request, exc: ServiceError) -> Response[HTTPError]:
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, ServiceUnavailable):
        headers = {"Retry-After": RETRY_AFTER_S}
    if exc.status_code >= 500:
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(exc.status_code, exc.message, headers)


def validation_error(_: Request, exc: ValidationException) -> Response[HTTPError]:
    """A body that does not decode into the request schema: 422 naming the field."""
    problems = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict):
            key, message = item.get("key"), item.get("message", "")
            # msgspec reports a missing field against the whole body ("data"); the message names it.
            problems.append(f"{key}: {message}" if key and key != "data" else str(message))
    msg = "; ".join(problems) or str(exc.detail)
    return error_response(HTTP_422_UNPROCESSABLE_ENTITY, f"Invalid request body: {msg}")


def http_error(_: Request, exc: HTTPException) -> Response[HTTPError]:
    return error_response(exc.status_code, str(exc.detail), exc.headers)


def internal_error(request: Request, exc: Exception) -> Response[HTTPError]:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "Internal server error.")


EXCEPTION_HANDLERS = {
    ServiceError: service_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
