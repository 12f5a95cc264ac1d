"""What the benchmarks share: the request they send, the service on its bundled Triton
(:class:`Stack`, on :mod:`export.fixtures.service`), the closed-loop HTTP load (:func:`drive`), and
the counters read around a measurement: CPU use, the service's ``/metrics`` stages and Triton's
statistics for its models.

Imports nothing of the service at module level, so that ``python -m bench`` starts light.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np

from export.contract import specs
from export.fixtures.service import ServiceProcess
from server.pipeline.request import Stage as PipelineStage

logger = logging.getLogger("bench")

PROMPT: Final = "a photo of a cat sitting on a windowsill"
# The stage names of the service's /metrics, and the Triton models whose statistics are read.
STAGES: Final = tuple(str(stage) for stage in PipelineStage)
TRITON_MODELS: Final = (specs.TEXT_ENCODER, specs.UNET, specs.VAE_DECODER, specs.SAFETY_CHECKER)
HTTP_TIMEOUT_S: Final = 600.0
STARTUP_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Size:
        """``WIDTHxHEIGHT`` (``256x384``: 256 wide, 384 high)."""
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"size '{text}' is not WIDTHxHEIGHT") from None
        if w < 64 or h < 64 or w % 8 or h % 8:
            raise ValueError(f"size '{text}': sides must be multiples of 8, at least 64")
        return cls(w, h)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Body:
    """The request every measurement sends, bar the seed."""

    size: Size
    steps: int
    guidance_scale: float
    safety_check: bool

    def json(self, seed: int) -> dict[str, Any]:
        return {
            "prompt": PROMPT,
            "height": self.size.height,
            "width": self.size.width,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "safety_check": self.safety_check,
            "seed": seed,
        }


# --------------------------------------------------------------------------------------------
# CPU use: ours and the rest of the machine's (a shared machine)


@dataclass(frozen=True)
class CpuSample:
    at: float  # perf_counter
    busy_s: float  # CPU seconds the whole machine spent busy since boot (/proc/stat)
    steal_s: float  # CPU seconds the hypervisor gave to other guests since boot (/proc/stat)
    ours_s: float  # CPU seconds of this process and its descendants (service, Triton, its stubs)


@dataclass
class CpuUse:
    """Cores busy on average over a measurement: ours (this benchmark's process tree), other processes',
    and stolen by the hypervisor (a VM's ``steal``)."""

    ours: float
    others: float
    stolen: float = 0.0


def cpu_sample() -> CpuSample:
    """Machine-wide busy time and this process tree's CPU time (Linux ``/proc``; zeros elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = steal = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy = the first 7 but idle and iowait.
        busy = (sum(fields[:7]) - fields[3] - fields[4]) / tick
        steal = fields[7] / tick
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(rest[1])
            times[int(entry.name)] = (int(rest[11]) + int(rest[12])) / tick
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return CpuSample(time.perf_counter(), busy, steal, sum(times.get(p, 0.0) for p in ours))


def cpu_use(before: CpuSample, after: CpuSample) -> CpuUse:
    wall = after.at - before.at
    if wall <= 0:
        return CpuUse(0.0, 0.0)
    ours = (after.ours_s - before.ours_s) / wall
    others = max(0.0, (after.busy_s - before.busy_s) / wall - ours)
    return CpuUse(ours, others, (after.steal_s - before.steal_s) / wall)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Stage:
    seconds: float  # sum over the level
    count: int  # observations (one per request; one per step for unet_step)


@dataclass
class TritonModelDelta:
    requests: int  # requests Triton answered successfully
    rows: int  # inference_count: batch rows
    executions: int  # execution_count: model executions (one per dynamic batch)
    queue_s: float  # summed over requests
    compute_s: float  # summed over executions (batch_stats compute_infer)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows per execution -> executions

    @property
    def rows_per_execution(self) -> float:
        return self.rows / self.executions if self.executions else 0.0

    @property
    def requests_per_execution(self) -> float:
        return self.requests / self.executions if self.executions else 0.0


@dataclass
class LevelResult:
    size: str
    concurrency: int
    requests: int
    errors: list[str]
    latencies: list[float]
    wall_s: float
    images: int
    stages: dict[str, Stage] = field(default_factory=dict)
    unet_batch_rows_mean: float = 0.0
    triton: dict[str, TritonModelDelta] = field(default_factory=dict)
    cpu: CpuUse = field(default_factory=lambda: CpuUse(0.0, 0.0))

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Model and repository (cached in --work)


@dataclass(frozen=True)
class Prepared:
    model_dir: Path
    repository: Path


# --------------------------------------------------------------------------------------------
# Triton and the service


class Stack:
    """The bundled Triton and the service (``python -m server``) on it; ``close()`` stops both."""

    def __init__(self, prepared: Prepared, work: Path, max_in_flight: int, max_pixels: int) -> None:
        self.prepared = prepared
        self.work = work
        self.max_in_flight = max_in_flight
        self.max_pixels = max_pixels
        self.triton: Any = None
        self.service: ServiceProcess | None = None
        self.url = ""
        self.grpc_url = ""
        self.service_log = work / "service.log"

    def start(self) -> None:
        from server.engines import repository_models
        from server.triton.launcher import BundledTriton, TritonLaunchConfig

        started = time.perf_counter()
        repository = self.prepared.repository.resolve()
        config = TritonLaunchConfig(
            model_repository=repository,
            state_dir=(self.work / "state").resolve(),
            explicit_model_control=True,
            load_models=repository_models(repository),
            startup_timeout_s=STARTUP_TIMEOUT_S,
        )
        self.triton = BundledTriton(config)
        self.triton.start()
        self.grpc_url = self.triton.grpc_url
        logger.info("Triton up at %s in %.1f s", self.grpc_url, time.perf_counter() - started)

        env = {
            "MODEL_ID": str(self.prepared.model_dir.resolve()),
            "MODEL_REPOSITORY": str(repository),
            "TRITON_URL": self.triton.http_url,
            "STATE_DIR": str((self.work / "state").resolve()),
            "MAX_IN_FLIGHT": str(self.max_in_flight),
            "MAX_QUEUE": str(max(32, self.max_in_flight)),
            "MAX_PIXELS": str(self.max_pixels),
            "WARMUP": "true",
        }
        self.service = ServiceProcess(
            env, self.service_log, args=("--log-level", "info"), ready_timeout_s=STARTUP_TIMEOUT_S, poll_s=0.2
        )
        self.url = self.service.url
        self.service.start().wait_ready()
        logger.info(
            "service up at %s in %.1f s (log: %s)", self.url, time.perf_counter() - started, self.service_log
        )

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        self.service = None
        if self.triton is not None:
            self.triton.stop()
            self.triton = None


@contextlib.contextmanager
def running_stack(prepared: Prepared, work: Path, max_in_flight: int, max_pixels: int) -> Iterator[Stack]:
    stack = Stack(prepared, work, max_in_flight, max_pixels)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


# --------------------------------------------------------------------------------------------
# Counters: the service's /metrics and Triton's statistics


def scrape_service(url: str) -> dict[str, float]:
    """``name{label=value}`` -> value for the stage histogram and the UNet row histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("t2i_stage_latency_seconds", "t2i_unet_batch_rows"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                stage = sample.labels.get("stage", "")
                values[f"{sample.name}{{{stage}}}"] = sample.value
    return values


def stage_deltas(before: dict[str, float], after: dict[str, float]) -> tuple[dict[str, Stage], float]:
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    stages = {
        s: Stage(
            delta(f"t2i_stage_latency_seconds_sum{{{s}}}"),
            round(delta(f"t2i_stage_latency_seconds_count{{{s}}}")),
        )
        for s in STAGES
    }
    rows_count = delta("t2i_unet_batch_rows_count{}")
    rows_mean = delta("t2i_unet_batch_rows_sum{}") / rows_count if rows_count else 0.0
    return stages, rows_mean


class TritonStats:
    def __init__(self, grpc_url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url=grpc_url)

    def close(self) -> None:
        self.client.close()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        stats = self.client.get_inference_statistics(as_json=True)
        return {m["name"]: m for m in stats.get("model_stats", []) if m["name"] in TRITON_MODELS}


def _ns(entry: dict[str, Any], key: str, what: str) -> int:
    return int(entry.get(key, {}).get(what, 0))


def triton_deltas(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> dict[str, TritonModelDelta]:
    deltas = {}
    for name, a in after.items():
        b = before.get(name, {})
        ai, bi = a.get("inference_stats", {}), b.get("inference_stats", {})
        batches_before = {int(x["batch_size"]): x for x in b.get("batch_stats", [])}
        sizes: dict[int, int] = {}
        compute_ns = 0
        for x in a.get("batch_stats", []):
            size = int(x["batch_size"])
            old = batches_before.get(size, {})
            n = _ns(x, "compute_infer", "count") - _ns(old, "compute_infer", "count")
            if n:
                sizes[size] = n
            compute_ns += _ns(x, "compute_infer", "ns") - _ns(old, "compute_infer", "ns")
        deltas[name] = TritonModelDelta(
            requests=_ns(ai, "success", "count") - _ns(bi, "success", "count"),
            rows=int(a.get("inference_count", 0)) - int(b.get("inference_count", 0)),
            executions=int(a.get("execution_count", 0)) - int(b.get("execution_count", 0)),
            queue_s=(_ns(ai, "queue", "ns") - _ns(bi, "queue", "ns")) / 1e9,
            compute_s=compute_ns / 1e9,
            batch_sizes=dict(sorted(sizes.items())),
        )
    return deltas


# --------------------------------------------------------------------------------------------
# Load


async def drive(url: str, body: Body, concurrency: int, requests: int, seed_base: int) -> LevelResult:
    """``requests`` requests by ``concurrency`` workers, each sending its next when answered."""
    latencies: list[float] = []
    errors: list[str] = []
    images = 0
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, images
        while next_index < requests:
            index = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                response = await client.post("/text-to-image", json=body.json(seed_base + index))
                payload = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - t0
            if payload is None:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            got = [i for i in payload.get("images", []) if str(i.get("url", "")).startswith("data:image/png")]
            if not got:
                errors.append("200 without a PNG image")
                continue
            latencies.append(elapsed)
            images += len(got)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return LevelResult(str(body.size), concurrency, requests, errors, latencies, wall, images)


# --------------------------------------------------------------------------------------------
# Reports and arguments


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive integers")
    return values
