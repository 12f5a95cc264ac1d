"""The service's one exception hierarchy; :mod:`server.api.errors` maps it to HTTP in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: ``status_code`` and a concise message that is safe to show a client."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status_code = 400


class BodyTooLarge(ServiceError):
    """The request body is over the operator's ``MAX_BODY_BYTES``."""

    status_code = 413


class UnprocessableBody(ServiceError):
    """The body is not JSON this service can decode (malformed, not UTF-8, nested too deeply)."""

    status_code = 422


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, message: str = "Invalid bearer token.") -> None:
        super().__init__(message)


class ServiceUnavailable(ServiceError):
    """The service cannot take the request now (still loading, Triton unreachable)."""

    status_code = 503


class TritonUnavailable(ServiceUnavailable):
    """Triton itself does not answer (gone, restarting): the service is unhealthy until it is back."""


class ModelUnavailable(ServiceUnavailable):
    """Triton answers but does not serve ``model`` now: not loaded, or its worker process died
    (``worker_dead``); the service reloads a base model that is in this state."""

    def __init__(self, message: str, model: str, worker_dead: bool = False) -> None:
        super().__init__(message)
        self.model = model
        self.worker_dead = worker_dead


class ClientGone(ServiceError):
    """The client disconnected; the generation stopped and nobody reads the answer."""

    status_code = 499


class InferenceFailed(ServiceError):
    status_code = 500


class OutOfMemory(InferenceFailed):
    def __init__(self, message: str = "Out of memory error. Try reducing output image resolution.") -> None:
        super().__init__(message)


BRIEF_CHARS = 100


def brief(text: str, limit: int = BRIEF_CHARS) -> str:
    """A client's value shortened for a message: the first ``limit`` characters and an ellipsis."""
    return text if len(text) <= limit else f"{text[:limit]}..."
