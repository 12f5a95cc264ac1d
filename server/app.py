"""``create_app(settings)``: the Litestar application, its lifespan running the supervisor.

The back end is wired here, once: the Triton backend is handed to the supervisor, the supervisor to
the service; the routes get the service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from export.models.heap import limit_arenas
from server.api.errors import EXCEPTION_HANDLERS
from server.api.request import APIRequest
from server.api.routes import SECURITY_COMPONENTS, route_handlers
from server.metrics import Metrics, request_metrics_middleware
from server.service import TextToImageService
from server.settings import Settings
from server.supervisor import Supervisor
from server.triton.backend import TritonBackend

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> Litestar:
    metrics = Metrics()
    backend = TritonBackend(settings)
    supervisor = Supervisor(settings, backend, metrics)
    service = TextToImageService(settings, supervisor, metrics)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        limit_arenas(settings.malloc_arena_max)
        supervisor.start()
        try:
            yield
        finally:
            await supervisor.close()

    def provide(value: object) -> Provide:
        return Provide(lambda: value, sync_to_thread=False)

    return Litestar(
        route_handlers=route_handlers(settings),
        request_class=APIRequest,
        request_max_body_size=settings.max_body_bytes,
        lifespan=[lifespan],
        dependencies={
            "settings": provide(settings),
            "service": provide(service),
            "metrics": provide(metrics),
        },
        middleware=[request_metrics_middleware(metrics)],  # type: ignore[list-item]
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(
            title="triton-t2i", version=settings.version, components=SECURITY_COMPONENTS
        ),
        state=State(
            {
                "settings": settings,
                "backend": backend,
                "supervisor": supervisor,
                "service": service,
                "metrics": metrics,
            }
        ),
    )
