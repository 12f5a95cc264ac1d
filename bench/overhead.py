"""Serving overhead per UNet step, end to end, and cold start: the service against its own floor.

What it runs, per model size (``tiny``: the bundled tiny SD model; ``mid``: SD 1.5's UNet at half
width with SD 1.5's full text encoder, :func:`bench.mid_model.build_mid_model`):

- **service**: the bundled Triton and the service (:class:`bench.common.Stack`), driven over HTTP at
  each concurrency level. Per UNet step: the service's ``unet_step`` stage (``/metrics``: scheduler
  math + the Triton call with its queueing) and Triton's own statistics for the ``unet`` model
  (queue time per request, compute time per execution, rows per execution).
- **floor** (:mod:`bench.floor`): the same exported ONNX graphs in a process of their own
  (``--floor-worker``), with the session options the Triton model uses (threads from the model's
  config / ``T2I_ORT_THREADS``, the same arena and spinning settings), while the service idles:
  ``graph``: the UNet graph alone on the very inputs the pipeline sends it (recorded from one
  in-process generation), at the rows of one request and at the rows Triton executed per batch;
  ``e2e``: the service's own pipeline code (:class:`server.pipeline.generate.TextToImagePipeline`,
  the safety check and the PNG encoding) over those graphs in-process, one request at a time, so its
  ``unet_step`` is the same stage as the service's, without serving.
- **interleaved**: each round runs the service at every level and then the floor, so drift of the
  machine lands on both; figures are medians over rounds.
- **pairs** (concurrency 1, ``--requests`` per round): one request to the idle service, then the
  same request to the floor (or the other way round, alternating), back to back; the concurrency-1
  ratios are medians of the pairs' own ratios, since this VM's speed drifts within a minute.
- **cold start**: ``python -m server`` with the bundled Triton on the exported repository, from the
  process start to ``/health`` OK (and, apart, ``import server.app`` in a fresh interpreter).

``python -m bench.overhead --sizes tiny,mid --concurrency 1,4 --rounds 3``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from bench import log_to_stderr, machine
from bench.common import (
    HTTP_TIMEOUT_S,
    PROMPT,
    Body,
    Prepared,
    Size,
    TritonStats,
    cpu_sample,
    cpu_use,
    drive,
    ms,
    positive_ints,
    running_stack,
    scrape_service,
    stage_deltas,
    triton_deltas,
)
from bench.floor import FloorProcess, floor_worker
from bench.plots import PLOT_DIR, overhead_chart
from export.fixtures.service import REPO_ROOT, ServiceProcess

logger = logging.getLogger("bench.overhead")

DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-overhead"
MODEL_SIZES: Final = ("tiny", "mid")
# The mid UNet costs many times the tiny one per step on a CPU (bench/RESULTS.md, overhead): fewer
# steps keep a round short.
STEPS: Final = {"tiny": 20, "mid": 8}
IMAGE: Final = Size(256, 256)
COLD_START_TIMEOUT_S: Final = 600.0


# --------------------------------------------------------------------------------------------
# One size: interleaved rounds of service levels and floor


@dataclass
class ServiceLevel:
    concurrency: int
    latencies: list[float]
    images_per_s: float
    step_s: float  # the service's unet_step stage per step
    triton_queue_s: float  # per UNet request
    triton_compute_s: float  # per UNet execution
    rows_per_execution: float
    cores: float


@dataclass
class FloorRound:
    latencies: list[float]
    step_s: float  # the in-process pipeline's unet_step stage per step
    graph_s: dict[int, float]  # rows -> median seconds per UNet graph call


@dataclass
class Pair:
    """One concurrency-1 request to the idle service and the same request (same seed) to the floor,
    back to back: the machine's drift lands on both alike (a VM's speed drifts by tens of percent
    within a minute), so the ratio of a pair is what the goals read."""

    service_step_s: float
    floor_step_s: float
    service_latency_s: float
    floor_latency_s: float


@dataclass
class SizeResult:
    size: str
    steps: int
    service: list[ServiceLevel] = field(default_factory=list)
    floor: list[FloorRound] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)


def measure_size(
    size: str, prepared: Prepared, work: Path, levels: list[int], rounds: int, requests: int
) -> SizeResult:
    steps = STEPS[size]
    body = Body(IMAGE, steps, 7.5, True)
    result = SizeResult(size, steps)
    floor = FloorProcess(prepared)
    try:
        floor.ask(op="record", body=body.json(0))
        with running_stack(prepared, work / size, max(levels), IMAGE.width * IMAGE.height) as stack:
            stats = TritonStats(stack.grpc_url)
            client = httpx.Client(base_url=stack.url, timeout=HTTP_TIMEOUT_S)
            try:
                asyncio.run(drive(stack.url, body, 1, 1, 0))  # warm
                for round_ in range(rounds):
                    executed_rows: list[float] = []
                    for concurrency in levels:
                        level = _service_level(stack.url, stats, body, concurrency, requests * concurrency)
                        result.service.append(level)
                        executed_rows.append(level.rows_per_execution)
                    # the service idles from here on: the floor runs alone
                    answer = floor.ask(op="e2e", bodies=[body.json(1000 + i) for i in range(requests)])
                    per_request = answer["requests"]
                    graph = {}
                    for rows in sorted({2, *(max(2, round(r)) for r in executed_rows)}):
                        seconds = floor.ask(op="graph", rows=rows, calls=max(10, steps))["seconds"]
                        graph[rows] = statistics.median(seconds)
                    result.floor.append(
                        FloorRound(
                            latencies=[r["latency"] for r in per_request],
                            step_s=statistics.median(r["step"] for r in per_request),
                            graph_s=graph,
                        )
                    )
                    for i in range(requests if 1 in levels else 0):
                        seed = 2000 + round_ * requests + i
                        result.pairs.append(_pair(client, stack.url, floor, body.json(seed), i % 2 == 1))
                    logger.info("%s: round %d of %d done", size, round_ + 1, rounds)
            finally:
                stats.close()
                client.close()
    finally:
        floor.close()
    return result


def _service_level(url: str, stats: TritonStats, body: Body, concurrency: int, requests: int) -> ServiceLevel:
    service_before, triton_before, cpu_before = scrape_service(url), stats.snapshot(), cpu_sample()
    level = asyncio.run(drive(url, body, concurrency, requests, 1000))
    cpu_after, service_after, triton_after = cpu_sample(), scrape_service(url), stats.snapshot()
    if level.errors:
        raise RuntimeError(f"concurrency {concurrency}: {level.errors[0]}")
    stages, _ = stage_deltas(service_before, service_after)
    unet = triton_deltas(triton_before, triton_after)["unet"]
    step = stages["unet_step"]
    return ServiceLevel(
        concurrency=concurrency,
        latencies=level.latencies,
        images_per_s=level.images_per_s,
        step_s=step.seconds / step.count,
        triton_queue_s=unet.queue_s / unet.requests,
        triton_compute_s=unet.compute_s / unet.executions,
        rows_per_execution=unet.rows_per_execution,
        cores=cpu_use(cpu_before, cpu_after).ours,
    )


def _pair(
    client: httpx.Client, url: str, floor: FloorProcess, body: dict[str, Any], floor_first: bool
) -> Pair:
    """The service and the floor on one request each, back to back (in alternating order)."""

    def service() -> tuple[float, float]:
        before = scrape_service(url)
        t0 = time.perf_counter()
        response = client.post("/text-to-image", json=body)
        latency = time.perf_counter() - t0
        if response.status_code != 200:
            raise RuntimeError(f"paired request: HTTP {response.status_code}: {response.text[:200]}")
        step = stage_deltas(before, scrape_service(url))[0]["unet_step"]
        return step.seconds / step.count, latency

    if floor_first:
        (theirs,) = floor.ask(op="e2e", bodies=[body])["requests"]
        ours = service()
    else:
        ours = service()
        (theirs,) = floor.ask(op="e2e", bodies=[body])["requests"]
    return Pair(ours[0], theirs["step"], ours[1], theirs["latency"])


# --------------------------------------------------------------------------------------------
# Cold start


@dataclass
class ColdStart:
    import_s: list[float]
    ready_s: list[float]


def measure_cold_start(prepared: Prepared, work: Path, repeats: int) -> ColdStart:
    """``import server.app`` in a fresh interpreter, and ``python -m server`` to ``/health`` OK."""
    imports, ready = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import server.app"], cwd=REPO_ROOT, check=True)
        imports.append(time.perf_counter() - t0)
        ready.append(_time_to_ok(prepared, work / f"cold-{i}"))
        logger.info("cold start %d: import %.2f s, ready %.2f s", i + 1, imports[-1], ready[-1])
    return ColdStart(imports, ready)


def _time_to_ok(prepared: Prepared, state: Path) -> float:
    env = {
        "MODEL_ID": str(prepared.model_dir.resolve()),
        "MODEL_REPOSITORY": str(prepared.repository.resolve()),
        "STATE_DIR": str(state.resolve()),
    }
    service = ServiceProcess(
        env,
        state.with_suffix(".log"),
        unset=("TRITON_URL",),
        ready_timeout_s=COLD_START_TIMEOUT_S,
        poll_s=0.05,
    )
    state.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    service.start()
    try:
        service.wait_ready()
        return time.perf_counter() - started
    finally:
        service.stop()


# --------------------------------------------------------------------------------------------
# Report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: list[SizeResult], cold: ColdStart | None) -> str:
    lines = [
        f"Body: {PROMPT!r}, {IMAGE}, guidance 7.5, safety_check true, 1 image. Medians over rounds.",
        "service step: the service's unet_step stage per step (/metrics: scheduler math + Triton call).",
        "floor step: the same stage of the same pipeline code with the graphs in-process, one request.",
        "Concurrency 1: step, p50 and their ratios are medians over pairs (one request to the idle "
        "service, the same one to the floor, back to back), ratios taken per pair.",
        "graph: the UNet graph alone in that process on the pipeline's inputs at the rows Triton "
        "executed per batch. Triton queue: per UNet request; compute: per execution.",
        "",
        "| model | steps | concurrency | service step ms | Triton queue ms | Triton compute ms | rows/exec "
        "| floor graph ms | floor step ms | service / floor step | overhead ms | images/s | p50 s "
        "| floor p50 s | p50 / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for concurrency in dict.fromkeys(s.concurrency for s in r.service):
            levels = [s for s in r.service if s.concurrency == concurrency]
            rows = _median([s.rows_per_execution for s in levels])
            graph = _median([f.graph_s.get(max(2, round(rows)), float("nan")) for f in r.floor])
            if concurrency == 1:  # one request's step against the floor's, pair by pair
                step = _median([p.service_step_s for p in r.pairs])
                floor_step = ms(_median([p.floor_step_s for p in r.pairs]))
                step_ratio = _median([p.service_step_s / p.floor_step_s for p in r.pairs])
                overhead = _median([p.service_step_s - p.floor_step_s for p in r.pairs])
                p50 = _median([p.service_latency_s for p in r.pairs])
                floor_p50 = f"{_median([p.floor_latency_s for p in r.pairs]):.3f}"
                p50_ratio = f"{_median([p.service_latency_s / p.floor_latency_s for p in r.pairs]):.2f}"
            else:  # under load a step waits for a batch: against the graph at the rows executed
                step = _median([s.step_s for s in levels])
                floor_step, floor_p50, p50_ratio = "-", "-", "-"
                step_ratio, overhead = step / graph, step - graph
                p50 = _median([_median(s.latencies) for s in levels])
            lines.append(
                f"| {r.size} | {r.steps} | {concurrency} | {ms(step)} "
                f"| {ms(_median([s.triton_queue_s for s in levels]))} "
                f"| {ms(_median([s.triton_compute_s for s in levels]))} | {rows:.2f} | {ms(graph)} "
                f"| {floor_step} | {step_ratio:.2f} | {ms(overhead)} "
                f"| {_median([s.images_per_s for s in levels]):.2f} | {p50:.3f} | {floor_p50} | {p50_ratio} |"
            )
    if cold is not None:
        lines += [
            "",
            f"Cold start (tiny repository, bundled Triton): `import server.app` "
            f"{', '.join(f'{s:.2f}' for s in cold.import_s)} s; process start to /health OK "
            f"{', '.join(f'{s:.2f}' for s in cold.ready_s)} s (median {_median(cold.ready_s):.2f} s).",
        ]
    return "\n".join(lines)


def _prepare(size: str, work: Path) -> Prepared:
    from export.fixtures.tiny import build_tiny_model
    from export.toolchain.options import RepositoryOptions
    from export.toolchain.repository import export_repository

    if size == "tiny":
        model_dir = build_tiny_model("sd", work / "models" / "tiny-sd")
    else:
        from bench.mid_model import build_mid_model

        model_dir = build_mid_model(work)
    repository = export_repository(
        str(model_dir), work / "repositories" / size, RepositoryOptions(check=False)
    )
    return Prepared(model_dir, repository)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Serving overhead per UNet step and cold start, against the same graphs in-process.",
    )
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated of tiny, mid (default both)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 4], help="levels (default 1,4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--requests", type=int, default=4, help="requests per round and level, per client")
    parser.add_argument("--cold-starts", type=int, default=2, help="cold starts of the tiny service")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of models and repositories")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument(
        "--plots", type=Path, default=PLOT_DIR, help=f"PNG chart goes here (default {PLOT_DIR})"
    )
    parser.add_argument("--floor-worker", nargs=2, type=Path, metavar=("MODEL_DIR", "REPOSITORY"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.floor_worker:
        return floor_worker(*args.floor_worker)
    log_to_stderr(args.verbose, logger)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in MODEL_SIZES for s in sizes):
        parser.error(f"--sizes takes {', '.join(MODEL_SIZES)}")
    if args.rounds < 1 or args.requests < 1 or args.cold_starts < 0:
        parser.error("--rounds and --requests must be at least 1, --cold-starts at least 0")

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    cold = None
    for size in sizes:
        prepared = _prepare(size, args.work)
        if size == "tiny" and args.cold_starts:
            cold = measure_cold_start(prepared, args.work, args.cold_starts)
        results.append(measure_size(size, prepared, args.work, args.concurrency, args.rounds, args.requests))
    header = [
        "command: python -m bench.overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        *machine(("torch", "onnxruntime", "tritonclient", "nvidia-pytriton")),
        f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"total runtime {time.perf_counter() - started:.0f} s",
    ]
    print("\n".join(header))
    print()
    print(report(results, cold))
    print(f"chart: {overhead_chart(results, args.plots)}")
    if args.json is not None:
        out = {"header": header, "sizes": [asdict(r) for r in results], "cold": cold and asdict(cold)}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
