"""Admission control: at most ``max_in_flight`` generations run, and at most ``max_in_flight +
max_queue`` requests are admitted at once, running or waiting.

A request that waits holds a place in the queue from the moment it arrives: while the service still
loads, and then for a free slot.  A request beyond both bounds is refused at once (``queue_full``)
instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from server.errors import ServiceUnavailable
from server.metrics import Metrics

T = TypeVar("T")


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, metrics: Metrics) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.waiting = 0

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting == 0

    @contextlib.asynccontextmanager
    async def slot(self, prepare: Callable[[], Awaitable[T]]) -> AsyncIterator[T]:
        """A place in the queue, ``await prepare()`` in it (wait for the service, check the request),
        then a running slot; yields what ``prepare`` returned."""
        if self.in_flight + self.waiting >= self.max_in_flight + self.max_queue:
            raise ServiceUnavailable(
                f"The service is busy ({self.in_flight} generations running, {self.waiting} waiting, "
                "MAX_IN_FLIGHT and MAX_QUEUE); try again shortly.",
                reason="queue_full",
            )
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            prepared = await prepare()
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield prepared
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            self._slots.release()
