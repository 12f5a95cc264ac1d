"""The one place where the service's errors become HTTP answers.

By default ``/text-to-image`` answers only what go-livepeer's AI worker (``Worker.TextToImage``) and the
``livepeer-ai`` SDK parse: 200, 400, 401, 422 and 500, with the reference runner's bodies.  400, 401 and
500 are ``{"detail": {"msg": "..."}}``; 422 is FastAPI's list of problems, each with ``loc`` naming the
field and pydantic 2's ``type``.  Any other status makes go-livepeer's client return a nil response with
a nil error, which crashes a remote AI worker and leaks an orchestrator's capacity unit.  A request that
cannot be served now (:class:`~server.errors.ServiceUnavailable`) is therefore a 500 whose message says
why, and a body over MAX_BODY_BYTES a 400; ``HTTP_RETRY_STATUSES`` turns 503 + ``Retry-After`` and 413
back on for deployments behind a generic load balancer.  Each refusal is counted by its ``reason``.
"""

from __future__ import annotations

import logging
import re

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from server.api.schemas import APIError, HTTPError, HTTPValidationError, ValidationError
from server.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnprocessableBody,
)
from server.metrics import MODEL_STATE_KEY, Metrics
from server.settings import Settings

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
# Never seen by anyone (the client has gone); nginx's name for it, so the request metric says so.
CLIENT_CLOSED_REQUEST = 499


def status_of(exc: ServiceError, retry_statuses: bool) -> int:
    """The HTTP status of a service error: every status decision of the service is here."""
    if isinstance(exc, BadRequest):
        return HTTP_400_BAD_REQUEST
    if isinstance(exc, BodyTooLarge):
        return HTTP_413_REQUEST_ENTITY_TOO_LARGE if retry_statuses else HTTP_400_BAD_REQUEST
    if isinstance(exc, UnprocessableBody):
        return HTTP_422_UNPROCESSABLE_ENTITY
    if isinstance(exc, Unauthorized):
        return HTTP_401_UNAUTHORIZED
    if isinstance(exc, ServiceUnavailable):
        return HTTP_503_SERVICE_UNAVAILABLE if retry_statuses else HTTP_500_INTERNAL_SERVER_ERROR
    if isinstance(exc, ClientGone):
        return CLIENT_CLOSED_REQUEST
    return HTTP_500_INTERNAL_SERVER_ERROR


def error_response(status_code: int, msg: str, headers: dict[str, str] | None = None) -> Response[HTTPError]:
    return Response(
        HTTPError(detail=APIError(msg=msg)),
        status_code=status_code,
        headers=headers,
        media_type=MediaType.JSON,
    )


def validation_response(problems: list[ValidationError]) -> Response[HTTPValidationError]:
    return Response(
        HTTPValidationError(detail=problems),
        status_code=HTTP_422_UNPROCESSABLE_ENTITY,
        media_type=MediaType.JSON,
    )


def service_error(request: Request, exc: ServiceError) -> Response[HTTPError] | Response[HTTPValidationError]:
    if isinstance(exc, UnprocessableBody):
        return validation_response([ValidationError(loc=list(exc.loc), msg=exc.message, type=exc.type)])
    settings: Settings = request.app.state.settings
    status = status_of(exc, settings.http_retry_statuses)
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, ServiceUnavailable):
        metrics: Metrics = request.app.state.metrics
        metrics.refused.labels(str(request.scope.get("state", {}).get(MODEL_STATE_KEY, "")), exc.reason).inc()
        if status == HTTP_503_SERVICE_UNAVAILABLE:
            headers = {"Retry-After": RETRY_AFTER_S}
    if status >= HTTP_500_INTERNAL_SERVER_ERROR:
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(status, exc.message, headers)


# msgspec's messages for a field of the wrong type -> pydantic 2's error type and message for it
# (what the reference, FastAPI on pydantic 2, answers); a string where a number or bool belongs is a
# "parsing" error there (pydantic would try to parse it), anything else a "type" error.
_EXPECTED = re.compile(r"Expected `(?P<expected>\w+)`(?:, got `(?P<got>\w+)`)?")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_PYDANTIC = {
    "str": ("string_type", "Input should be a valid string"),
    "int": ("int_type", "Input should be a valid integer"),
    "float": ("float_type", "Input should be a valid number"),
    "bool": ("bool_type", "Input should be a valid boolean"),
    "object": (
        "model_attributes_type",
        "Input should be a valid dictionary or object to extract fields from",
    ),
}
_FROM_STRING = {
    "int": ("int_parsing", "Input should be a valid integer, unable to parse string as an integer"),
    "float": ("float_parsing", "Input should be a valid number, unable to parse string as a number"),
    "bool": ("bool_parsing", "Input should be a valid boolean, unable to interpret input"),
}
_INT_FROM_FLOAT = ("int_from_float", "Input should be a valid integer, got a number with a fractional part")


def body_problem(key: str | None, message: str) -> ValidationError:
    """One of Litestar's validation problems (msgspec's message for ``key``) as FastAPI's."""
    field = None if key in (None, "", "data") else key  # msgspec names the whole body "data"
    if field is None and message == "'data'":  # no body at all: Litestar's KeyError for the body itself
        return ValidationError(loc=["body"], msg="Field required", type="missing")
    missing = _MISSING.fullmatch(message)
    if missing:
        return ValidationError(loc=["body", missing["field"]], msg="Field required", type="missing")
    loc: list[str | int] = ["body"] if field is None else ["body", field]
    expected = _EXPECTED.match(message)
    if expected:
        kind, got = expected["expected"], expected["got"]
        if kind == "int" and got == "float":
            error_type, msg = _INT_FROM_FLOAT
        elif got == "str" and kind in _FROM_STRING:
            error_type, msg = _FROM_STRING[kind]
        elif kind in _PYDANTIC:
            error_type, msg = _PYDANTIC[kind]
        else:
            error_type, msg = "value_error", message
        return ValidationError(loc=loc, msg=msg, type=error_type)
    return ValidationError(loc=loc, msg=message, type="value_error")


def validation_error(_: Request, exc: ValidationException) -> Response[HTTPValidationError]:
    """A body that does not decode into the request schema: 422 naming the field."""
    problems = [
        body_problem(item.get("key"), str(item.get("message", "")))
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    ]
    return validation_response(
        problems or [ValidationError(loc=["body"], msg=str(exc.detail), type="value_error")]
    )


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
