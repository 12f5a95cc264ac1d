"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process).

Every series about one model carries its id as the label ``model`` (:meth:`Metrics.model` binds it);
admission (``t2i_generations_in_flight``, ``t2i_queue_depth``) is shared by the models, so unlabelled.
A request whose model is not known (a body that does not parse, an unknown id) is counted under
``model=""``.
"""

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
            "t2i_requests",
            "Generation requests answered, by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "t2i_request_latency_seconds",
            "Generation request latency, by model and HTTP status",
            ["model", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "t2i_stage_latency_seconds",
            "Latency of one stage of a generation",
            ["model", "stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("t2i_generations_in_flight", "Generations running now", registry=r)
        self.queue_depth = Gauge("t2i_queue_depth", "Generations waiting for a slot", registry=r)
        self.generations = Counter(
            "t2i_generations", "Generations that reached the pipeline", ["model"], registry=r
        )
        self.unet_steps = Counter("t2i_unet_steps", "UNet steps run", ["model"], registry=r)
        self.unet_rows = Histogram(
            "t2i_unet_batch_rows",
            "Rows one request sends per UNet step (Triton batches across requests)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.images = Counter("t2i_images", "Images returned", ["model"], registry=r)
        self.refused = Counter(
            "t2i_requests_refused",
            "Generation requests the service could not serve now, by reason (queue_full, loading, "
            "deadline, triton_unavailable, model_unavailable, hub_timeout, lora_cache_full, not_loaded)",
            ["model", "reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "t2i_generations_cancelled",
            "Generations stopped early, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.variant_builds = Counter(
            "t2i_lora_variant_builds", "LoRA variants merged and written", ["model"], registry=r
        )
        self.variant_build_seconds = Histogram(
            "t2i_lora_variant_build_seconds",
            "Time to merge and write one LoRA variant",
            ["model"],
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.variants_loaded = Gauge(
            "t2i_lora_variants_loaded", "LoRA variants loaded in Triton", ["model"], registry=r
        )
        self.resident = Gauge(
            "t2i_model_resident", "1 while the model is loaded in Triton, else 0", ["model"], registry=r
        )
        self.model_memory = Gauge(
            "t2i_model_memory_bytes",
            "Memory the model holds while resident (measured at its load; its LoRA variants included)",
            ["model"],
            registry=r,
        )
        self.memory_budget = Gauge(
            "t2i_model_memory_budget_bytes", "MODEL_MEMORY_GB in bytes (0: no bound)", registry=r
        )
        self.loads = Counter(
            "t2i_model_loads", "Times the model was loaded into Triton", ["model"], registry=r
        )
        self.evictions = Counter(
            "t2i_model_evictions",
            "Times the model was unloaded to make room for another",
            ["model"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "t2i_model_load_seconds",
            "Time to load the model into Triton (its Triton models, then its pipeline)",
            ["model"],
            buckets=(0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
            registry=r,
        )

    def model(self, model_id: str) -> ModelMetrics:
        """The series of one model (created, at zero, on first use)."""
        return ModelMetrics(self, model_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's series, its ``model`` label bound."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self.model_id = model_id
        self._metrics = metrics
        self.generations = metrics.generations.labels(model_id)
        self.unet_steps = metrics.unet_steps.labels(model_id)
        self.unet_rows = metrics.unet_rows.labels(model_id)
        self.images = metrics.images.labels(model_id)
        self.variant_builds = metrics.variant_builds.labels(model_id)
        self.variant_build_seconds = metrics.variant_build_seconds.labels(model_id)
        self.variants_loaded = metrics.variants_loaded.labels(model_id)
        self.resident = metrics.resident.labels(model_id)
        self.memory = metrics.model_memory.labels(model_id)
        self.loads = metrics.loads.labels(model_id)
        self.evictions = metrics.evictions.labels(model_id)
        self.load_seconds = metrics.load_seconds.labels(model_id)
        for stage in STAGES:
            self.stage(stage)

    def stage(self, stage: str) -> Histogram:
        return self._metrics.stage_latency.labels(self.model_id, stage)

    def cancelled(self, reason: str) -> Counter:
        return self._metrics.cancelled.labels(self.model_id, reason)


# Where a request's handler records its model for the middleware (``scope["state"]``).
MODEL_STATE_KEY = "t2i_model"


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
                model = str(scope.get("state", {}).get(MODEL_STATE_KEY, ""))
                metrics.requests.labels(model, status).inc()
                metrics.request_latency.labels(model, status).observe(time.perf_counter() - started)

        return middleware

    return factory
