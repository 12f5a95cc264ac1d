"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.pipeline.request import Stage

STAGES = tuple(Stage)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "t2i_requests", "Generation requests answered, by HTTP status", ["status"], registry=r
        )
        self.request_latency = Histogram(
            "t2i_request_latency_seconds",
            "Generation request latency, by HTTP status",
            ["status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "t2i_stage_latency_seconds",
            "Latency of one stage of a generation",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("t2i_generations_in_flight", "Generations running now", registry=r)
        self.queue_depth = Gauge("t2i_queue_depth", "Generations waiting for a slot", registry=r)
        self.generations = Counter("t2i_generations", "Generations that reached the pipeline", registry=r)
        self.unet_steps = Counter("t2i_unet_steps", "UNet steps run", registry=r)
        self.unet_rows = Histogram(
            "t2i_unet_batch_rows",
            "Rows one request sends per UNet step (Triton batches across requests)",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.images = Counter("t2i_images", "Images returned", registry=r)
        self.refused = Counter(
            "t2i_requests_refused",
            "Generation requests the service could not serve now, by reason (queue_full, loading, "
            "deadline, triton_unavailable, model_unavailable, hub_timeout, lora_cache_full, not_loaded)",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "t2i_generations_cancelled", "Generations stopped early, by reason", ["reason"], registry=r
        )
        self.variant_builds = Counter(
            "t2i_lora_variant_builds", "LoRA variants merged and written", registry=r
        )
        self.variant_build_seconds = Histogram(
            "t2i_lora_variant_build_seconds",
            "Time to merge and write one LoRA variant",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.variants_loaded = Gauge("t2i_lora_variants_loaded", "LoRA variants loaded in Triton", registry=r)
        for stage in STAGES:
            self.stage_latency.labels(stage)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def request_metrics_middleware(
    metrics: Metrics, prefix: str = "/text-to-image"
) -> Callable[[ASGIApp], ASGIApp]:
    """Counts and times every generation request by the status it was answered with."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(
            scope: Scope,
            receive: Callable[[], Awaitable[Message]],
            send: Callable[[Message], Awaitable[None]],
        ) -> None:
            if scope["type"] != "http" or not str(scope.get("path", "")).startswith(prefix):
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = "499"  # the client went away before an answer started

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = str(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            finally:
                metrics.requests.labels(status).inc()
                metrics.request_latency.labels(status).observe(time.perf_counter() - started)

        return middleware

    return factory
