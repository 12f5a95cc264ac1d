"""The service's one exception hierarchy; :mod:`server.api.errors` maps it to HTTP in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: a concise message that is safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    """A rule of the API is broken (the reference's 400)."""


class BodyTooLarge(ServiceError):
    """The request body is over the operator's ``MAX_BODY_BYTES``."""


class UnprocessableBody(ServiceError):
    """The body does not decode into the request schema; ``loc`` and ``type`` as FastAPI names them
    (``("body", "height")`` and ``"int_type"``; ``("body", 12)`` and ``"json_invalid"`` for JSON that
    does not parse at character 12)."""

    def __init__(
        self, message: str, loc: tuple[str | int, ...] = ("body",), type: str = "json_invalid"
    ) -> None:
        super().__init__(message)
        self.loc = loc
        self.type = type


class Unauthorized(ServiceError):
    def __init__(self, message: str = "Invalid bearer token.") -> None:
        super().__init__(message)


class ServiceUnavailable(ServiceError):
    """The service cannot serve the request now; ``reason`` says why in a word (the label of the
    refusals metric): ``queue_full``, ``loading``, ``deadline``, ``triton_unavailable``,
    ``model_unavailable``, ``hub_timeout``, ``lora_cache_full``, ``not_loaded``."""

    reason = "unavailable"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TritonUnavailable(ServiceUnavailable):
    """Triton itself does not answer (gone, restarting): the service is unhealthy until it is back."""

    reason = "triton_unavailable"


class ModelUnavailable(ServiceUnavailable):
    """Triton answers but does not serve ``model`` now: not loaded, or its worker process died
    (``worker_dead``); the service reloads a base model that is in this state."""

    reason = "model_unavailable"

    def __init__(self, message: str, model: str, worker_dead: bool = False) -> None:
        super().__init__(message)
        self.model = model
        self.worker_dead = worker_dead


class ClientGone(ServiceError):
    """The client disconnected; the generation stopped and nobody reads the answer."""


class InferenceFailed(ServiceError):
    pass


class OutOfMemory(InferenceFailed):
    def __init__(self, message: str = "Out of memory error. Try reducing output image resolution.") -> None:
        super().__init__(message)


BRIEF_CHARS = 100


def brief(text: str, limit: int = BRIEF_CHARS) -> str:
    """A client's value shortened for a message: the first ``limit`` characters and an ellipsis."""
    return text if len(text) <= limit else f"{text[:limit]}..."
