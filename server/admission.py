"""Admission control: at most ``max_in_flight`` generations run, at most ``max_queue`` wait.

A request beyond both is refused at once (503 with Retry-After) instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from server.errors import ServiceUnavailable
from server.metrics import Metrics


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, metrics: Metrics) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.in_flight >= self.max_in_flight and self.waiting >= self.max_queue:
            raise ServiceUnavailable(
                f"The service is busy ({self.in_flight} generations running, {self.waiting} waiting); "
                "try again shortly."
            )
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            self._slots.release()
