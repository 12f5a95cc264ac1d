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
import gc
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from bench import log_to_stderr, machine
from bench.common import (
    PROMPT,
    STAGES,
    Body,
    CpuUse,
    LevelResult,
    Prepared,
    Size,
    Stack,
    TritonStats,
    cpu_sample,
    cpu_use,
    drive,
    ms,
    percentile,
    positive_ints,
    running_stack,
    scrape_service,
    stage_deltas,
    triton_deltas,
)
from bench.plots import PLOT_DIR, load_charts
from export.toolchain.options import TARGETS, Target

logger = logging.getLogger("bench.load")

DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-load"
SEED_BASE: Final = 1000


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


# --------------------------------------------------------------------------------------------
# Model and repository (cached in --work)


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
# Load: the service at each concurrency level


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
        step_ms = ms(step.seconds / step.count) if step and step.count else "-"
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
            f"| {ms(u.queue_s / u.requests) if u.requests else '-'} "
            f"| {ms(u.compute_s / u.executions) if u.executions else '-'} "
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
        type=positive_ints,
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
