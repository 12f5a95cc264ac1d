"""``create_app(settings)``: the Litestar application with a lifespan owning the runtime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from server.api.errors import EXCEPTION_HANDLERS
from server.api.routes import ROUTES
from server.runtime import Runtime
from server.service import TextToImageService
from server.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> Litestar:
    runtime = Runtime(settings)
    service = TextToImageService(settings, runtime)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    return Litestar(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        dependencies={
            "runtime": Provide(lambda: runtime, sync_to_thread=False),
            "service": Provide(lambda: service, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(title="triton-t2i", version=settings.version),
        state=State({"settings": settings, "runtime": runtime}),
    )
