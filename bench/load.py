"""Load benchmark: the HTTP API under a bounded, concurrent load against diffusers in-process.

What it runs (docs/ARCHITECTURE.md section 7):

- **setup**: the tiny SD model (:func:`export.fixtures.tiny.build_tiny_model`) exported to a Triton repository
  (``RepositoryOptions(check=False)``: no ONNX-vs-torch check), both cached in ``--work``; the bundled
  Triton on that repository (explicit model control, the base models loaded, as the service runs it)
  and the service as a subprocess (``python -m server`` with ``TRITON_URL`` pointing at that Triton,
  ``MAX_IN_FLIGHT`` = the highest concurrency, ``WARMUP`` on), on free loopback ports. Both are
  stopped at the end, also on error.
- **ours**: for each size and concurrency level, ``--requests`` requests of one body (distinct seeds)
  sent over HTTP with ``httpx.AsyncClient`` by ``concurrency`` workers, each sending its next request
  when its last one is answered (a closed loop). Reported: client-side latency p50/p95/p99 (linear
  interpolation between order statistics: with 16 requests, p99 is close to the maximum), images/s
  (images / wall time from the first send to the last answer), the service's per-stage split from
  ``/metrics`` (``t2i_stage_latency_seconds`` sum/count deltas; ``t2i_unet_batch_rows``) and Triton's
  own statistics for the ``unet`` model (``get_inference_statistics``: rows per execution and the
  histogram of executed batch sizes, the proof that concurrent requests' steps run as one batch).
- **baseline**: what a user would run instead, diffusers' ``StableDiffusionPipeline`` in this process
  on the same model folder (fp32, CPU, ``torch.set_num_threads(nproc)``, with the model's safety
  checker, which the pipeline runs on every image), one image at a time as Livepeer's reference
  runner does, the same body and seeds, the same number of requests one after the other; each
  image is then encoded as a PNG data URL (PIL defaults), as the runner's route does. It runs before
  Triton and the service start, so nothing else of this benchmark competes for the cores.

One untimed warm-up request per size precedes the measurements, for both. Absolute figures hold
only for the machine they ran on.

``python -m bench.load --sizes 256x256 --steps 20 --concurrency 1,2,4,8 --requests 16``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import httpx
import numpy as np

from bench import log_to_stderr, machine
from bench.plots import PLOT_DIR, load_charts
from export.toolchain.options import TARGETS, Target

logger = logging.getLogger("bench.load")

DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-load"
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
PROMPT: Final = "a photo of a cat sitting on a windowsill"
SEED_BASE: Final = 1000
# Stage names as the service exports them (server.metrics.STAGES), kept here so that ``python -m
# bench`` does not import the service.
STAGES: Final = ("text_encoder", "unet_step", "vae", "safety_check", "png_encode")
TRITON_MODELS: Final = ("text_encoder", "unet", "vae_decoder", "safety_checker")
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


@dataclass
class BaselineResult:
    size: str
    requests: int
    latencies: list[float]
    wall_s: float
    images: int
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


def prepare(work: Path, target: Target = "python-onnx") -> Prepared:
    from export.fixtures.tiny import build_tiny_model
    from export.toolchain.options import RepositoryOptions
    from export.toolchain.repository import export_repository

    started = time.perf_counter()
    model_dir = build_tiny_model("sd", work / "models" / "tiny-sd")
    # check=False: no ONNX-vs-torch comparison at export (the test suite does that for the tiny model).
    name = "sd" if target == "python-onnx" else f"sd-{target}"
    repository = export_repository(
        str(model_dir),
        work / "repositories" / name,
        RepositoryOptions(target=target, check=False),
    )
    logger.info("model and repository ready in %.1f s", time.perf_counter() - started)
    return Prepared(model_dir, repository)


# --------------------------------------------------------------------------------------------
# Baseline: diffusers in-process, one image at a time


class DiffusersBaseline:
    """``StableDiffusionPipeline`` on the model folder, fp32 on CPU, as the reference runner loads it."""

    def __init__(self, model_dir: Path, threads: int, safety_check: bool) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(threads)
        kwargs: dict[str, Any] = {} if safety_check else {"safety_checker": None}
        pipe = cast(Any, StableDiffusionPipeline).from_pretrained(model_dir, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def generate(self, body: Body, seed: int) -> int:
        """One request's work: the pipeline call (safety checker included) and the PNG data URLs."""
        import torch

        out = self.pipe(
            prompt=PROMPT,
            height=body.size.height,
            width=body.size.width,
            num_inference_steps=body.steps,
            guidance_scale=body.guidance_scale,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        urls = []
        for image in out.images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
        return len(urls)


def run_baseline(prepared: Prepared, bodies: list[Body], requests: int, warmup: int) -> list[BaselineResult]:
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    baseline = DiffusersBaseline(prepared.model_dir, threads, bodies[0].safety_check)
    logger.info(
        "diffusers pipeline loaded in %.1f s (torch threads %d)", time.perf_counter() - started, threads
    )
    results = []
    for body in bodies:
        for i in range(warmup):
            baseline.generate(body, SEED_BASE - 1 - i)
        latencies: list[float] = []
        images = 0
        cpu_before = cpu_sample()
        for i in range(requests):
            t0 = time.perf_counter()
            images += baseline.generate(body, SEED_BASE + i)
            latencies.append(time.perf_counter() - t0)
        cpu_after = cpu_sample()
        wall = cpu_after.at - cpu_before.at
        result = BaselineResult(
            str(body.size), requests, latencies, wall, images, cpu_use(cpu_before, cpu_after)
        )
        logger.info(
            "baseline %s: p50 %.3f s, %.2f images/s",
            body.size,
            percentile(latencies, 50),
            result.images_per_s,
        )
        results.append(result)
    del baseline
    gc.collect()
    return results


# --------------------------------------------------------------------------------------------
# Triton and the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The bundled Triton and the service (``python -m server``) on it; ``close()`` stops both."""

    def __init__(self, prepared: Prepared, work: Path, max_in_flight: int, max_pixels: int) -> None:
        self.prepared = prepared
        self.work = work
        self.max_in_flight = max_in_flight
        self.max_pixels = max_pixels
        self.triton: Any = None
        self.service: subprocess.Popen[bytes] | None = None
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

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "MODEL_ID": str(self.prepared.model_dir.resolve()),
            "MODEL_REPOSITORY": str(repository),
            "TRITON_URL": self.triton.http_url,
            "STATE_DIR": str((self.work / "state").resolve()),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "MAX_IN_FLIGHT": str(self.max_in_flight),
            "MAX_QUEUE": str(max(32, self.max_in_flight)),
            "MAX_PIXELS": str(self.max_pixels),
            "WARMUP": "true",
        }
        with self.service_log.open("wb") as log:
            self.service = subprocess.Popen(
                [sys.executable, "-m", "server", "--log-level", "info"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()
        logger.info(
            "service up at %s in %.1f s (log: %s)", self.url, time.perf_counter() - started, self.service_log
        )

    def _wait_ready(self) -> None:
        assert self.service is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if self.service.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self.service.returncode}; see {self.service_log}"
                )
            with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                status = httpx.get(f"{self.url}/health", timeout=5).json()["status"]
                if status in ("OK", "IDLE"):
                    return
                if status == "ERROR":  # Triton is up already: an error now is the service's own
                    raise RuntimeError(f"the service failed to start; see {self.service_log}")
            time.sleep(0.2)
        raise TimeoutError(f"the service did not become ready (last status {status}); see {self.service_log}")

    def close(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                logger.warning("the service did not stop on SIGTERM; killing it")
                self.service.kill()
                self.service.wait(timeout=30)
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


def run_load(
    stack: Stack, bodies: list[Body], levels: list[int], requests: int, warmup: int
) -> list[LevelResult]:
    stats = TritonStats(stack.grpc_url)
    results = []
    try:
        for body in bodies:
            if warmup:
                warm = asyncio.run(drive(stack.url, body, 1, warmup, SEED_BASE - warmup))
                if warm.errors:
                    raise RuntimeError(f"warm-up request failed: {warm.errors[0]}")
            for concurrency in levels:
                service_before, triton_before = scrape_service(stack.url), stats.snapshot()
                cpu_before = cpu_sample()
                result = asyncio.run(drive(stack.url, body, concurrency, requests, SEED_BASE))
                cpu_after = cpu_sample()
                service_after, triton_after = scrape_service(stack.url), stats.snapshot()
                result.cpu = cpu_use(cpu_before, cpu_after)
                result.stages, result.unet_batch_rows_mean = stage_deltas(service_before, service_after)
                result.triton = triton_deltas(triton_before, triton_after)
                unet = result.triton.get("unet")
                logger.info(
                    "%s concurrency %d: p50 %.3f s, %.2f images/s, unet rows/execution %.2f, errors %d",
                    body.size,
                    concurrency,
                    percentile(result.latencies, 50),
                    result.images_per_s,
                    unet.rows_per_execution if unet else float("nan"),
                    len(result.errors),
                )
                results.append(result)
    finally:
        stats.close()
    return results


# --------------------------------------------------------------------------------------------
# Report


def _s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def report(levels: list[LevelResult], baselines: list[BaselineResult], body: Body, requests: int) -> str:
    lines = [
        f"Body: {PROMPT!r}, {body.steps} steps, guidance {body.guidance_scale:g}, "
        f"safety_check {str(body.safety_check).lower()}, 1 image, distinct seeds; "
        f"{requests} requests per row. Latency: client-side seconds per request (p99 of {requests} "
        "is close to the maximum). images/s: images / wall time of the row. "
        "x baseline: ours images/s / baseline images/s. cores ours / others / stolen: CPU seconds per "
        "wall second during the row of this benchmark's process tree (client, service, Triton and its "
        "stubs; the diffusers pipeline for the baseline), of every other process on the machine, and "
        "taken by the hypervisor (steal).",
        "",
        "| size | runner | concurrency | ok/sent | p50 s | p95 s | p99 s | images/s | x baseline "
        "| cores ours | cores others | cores stolen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_by_size = {b.size: b for b in baselines}
    for size in dict.fromkeys([*(b.size for b in baselines), *(r.size for r in levels)]):
        b = base_by_size.get(size)
        if b is not None:
            lines.append(
                f"| {b.size} | diffusers in-process (sequential) | 1 | {len(b.latencies)}/{b.requests} "
                f"| {_s(percentile(b.latencies, 50))} | {_s(percentile(b.latencies, 95))} "
                f"| {_s(percentile(b.latencies, 99))} | {b.images_per_s:.2f} | 1.00 "
                f"| {b.cpu.ours:.2f} | {b.cpu.others:.2f} | {b.cpu.stolen:.2f} |"
            )
        for r in (r for r in levels if r.size == size):
            ratio = f"{r.images_per_s / b.images_per_s:.2f}" if b is not None and b.images_per_s else "-"
            lines.append(
                f"| {r.size} | service over HTTP | {r.concurrency} | {len(r.latencies)}/{r.requests} "
                f"| {_s(percentile(r.latencies, 50))} | {_s(percentile(r.latencies, 95))} "
                f"| {_s(percentile(r.latencies, 99))} | {r.images_per_s:.2f} | {ratio} "
                f"| {r.cpu.ours:.2f} | {r.cpu.others:.2f} | {r.cpu.stolen:.2f} |"
            )
    for b in baselines:
        first = next((r for r in levels if r.size == b.size and r.concurrency == 1), None)
        if first is not None and first.latencies:
            p50_ratio = percentile(first.latencies, 50) / percentile(b.latencies, 50)
            lines += ["", f"{b.size}: ours p50 at concurrency 1 / baseline p50 = {p50_ratio:.2f}"]

    lines += [
        "",
        "Where a request's time goes in the service (from /metrics deltas): seconds per request in each "
        "stage (stage sum / requests; unet_step is all steps of a request, each step = scheduler math + "
        "the Triton call incl. its queueing); rest = mean client latency - those stages (HTTP, JSON, "
        "admission wait, event loop).",
        "",
        "| size | concurrency | mean latency s | " + " | ".join(STAGES) + " | rest | UNet step ms |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for r in levels:
        n = max(len(r.latencies), 1)
        mean = sum(r.latencies) / n if r.latencies else float("nan")
        per_request = {s: r.stages[s].seconds / n if s in r.stages else 0.0 for s in STAGES}
        step = r.stages.get("unet_step")
        step_ms = _ms(step.seconds / step.count) if step and step.count else "-"
        lines.append(
            f"| {r.size} | {r.concurrency} | {_s(mean)} | "
            + " | ".join(_s(per_request[s]) for s in STAGES)
            + f" | {_s(mean - sum(per_request.values()))} | {step_ms} |"
        )

    lines += [
        "",
        "Triton's dynamic batcher on the `unet` model (get_inference_statistics deltas): rows sent per "
        "request by the service (t2i_unet_batch_rows mean; 2 = classifier-free guidance), requests and "
        "executions, rows per execution (the mean dynamic batch), executed batch sizes (rows: executions), "
        "mean queue ms per request, mean compute ms per execution, busy = unet compute time / wall "
        "time of the row (one model instance: 100% is its ceiling).",
        "",
        "| size | concurrency | rows/request | requests | executions | rows/execution | requests/execution "
        "| batch sizes | queue ms | compute ms/execution | busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        u = r.triton.get("unet")
        if u is None:
            continue
        sizes = ", ".join(f"{k}: {v}" for k, v in u.batch_sizes.items())
        lines.append(
            f"| {r.size} | {r.concurrency} | {r.unet_batch_rows_mean:.2f} | {u.requests} | {u.executions} "
            f"| {u.rows_per_execution:.2f} | {u.requests_per_execution:.2f} | {sizes} "
            f"| {_ms(u.queue_s / u.requests) if u.requests else '-'} "
            f"| {_ms(u.compute_s / u.executions) if u.executions else '-'} "
            f"| {100 * u.compute_s / r.wall_s:.0f}% |"
        )
    errors = [(r, e) for r in levels for e in r.errors]
    if errors:
        lines += ["", f"Errors ({len(errors)}):"]
        lines += [f"- {r.size} concurrency {r.concurrency}: {e}" for r, e in errors[:20]]
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def _positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive integers")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="Drive the text-to-image API with a concurrent load; compare with diffusers in-process.",
    )
    parser.add_argument("--sizes", default="256x256", help="comma-separated WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance_scale (default 7.5)")
    parser.add_argument("--no-safety-check", action="store_true", help="send safety_check false")
    parser.add_argument(
        "--concurrency",
        type=_positive_ints,
        default=[1, 2, 4, 8],
        help="comma-separated levels (default 1,2,4,8)",
    )
    parser.add_argument("--requests", type=int, default=16, help="requests per level and for the baseline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per size before measuring")
    parser.add_argument("--no-baseline", action="store_true", help="skip diffusers in-process")
    parser.add_argument(
        "--target", choices=TARGETS, default="python-onnx", help="Triton target (default python-onnx)"
    )
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of the model and repository")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument(
        "--plots", type=Path, default=PLOT_DIR, help=f"PNG charts go here (default {PLOT_DIR})"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose, logger)
    try:
        sizes = [Size.parse(s.strip()) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        parser.error(str(e))
    if not sizes:
        parser.error("--sizes is empty")
    if args.steps < 1 or args.requests < 1 or args.warmup < 0:
        parser.error("--steps and --requests must be at least 1, --warmup at least 0")
    levels: list[int] = args.concurrency
    bodies = [Body(s, args.steps, args.guidance, not args.no_safety_check) for s in sizes]

    uptime_before = _uptime()
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args.work, cast(Target, args.target))
    baselines = [] if args.no_baseline else run_baseline(prepared, bodies, args.requests, args.warmup)
    max_pixels = max(1024 * 1024, *(s.width * s.height for s in sizes))
    with running_stack(prepared, args.work, max(levels), max_pixels) as stack:
        results = run_load(stack, bodies, levels, args.requests, args.warmup)
    elapsed = time.perf_counter() - started
    uptime_after = _uptime()

    header = [
        "command: python -m bench.load " + " ".join(sys.argv[1:] if argv is None else argv),
        *machine(("torch", "onnxruntime", "diffusers", "tritonclient", "nvidia-pytriton", "httpx")),
        f"uptime before: {uptime_before}",
        f"uptime after:  {uptime_after}",
        f"total runtime {elapsed:.0f} s (model build and export included unless cached in {args.work})",
    ]
    print("\n".join(header))
    print()
    print(report(results, baselines, bodies[0], args.requests))
    for path in load_charts(results, baselines, STAGES, args.plots):
        print(f"chart: {path}")
    if args.json is not None:
        out = {
            "command": header[0],
            "machine": header[1:3],
            "uptime": [uptime_before, uptime_after],
            "runtime_s": elapsed,
            "baseline": [asdict(b) for b in baselines],
            "levels": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
