"""Serving overhead per UNet step, end to end, and cold start: the service against its own floor.

What it runs, per model size (``tiny``: the bundled tiny SD model; ``mid``: SD 1.5's UNet at half
width with SD 1.5's full text encoder, :func:`bench.mid_model.build_mid_model`):

- **service**: the bundled Triton and the service (:class:`bench.load.Stack`), driven over HTTP at
  each concurrency level. Per UNet step: the service's ``unet_step`` stage (``/metrics``: scheduler
  math + the Triton call with its queueing) and Triton's own statistics for the ``unet`` model
  (queue time per request, compute time per execution, rows per execution).
- **floor**: the same exported ONNX graphs in a process of their own (``--floor-worker``), with the
  session options the Triton model uses (threads from the model's config / ``T2I_ORT_THREADS``, the
  same arena and spinning settings), while the service idles:
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
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np

from bench import log_to_stderr, machine
from bench.load import (
    HTTP_TIMEOUT_S,
    PROMPT,
    REPO_ROOT,
    Body,
    Prepared,
    Size,
    TritonStats,
    cpu_sample,
    cpu_use,
    drive,
    free_port,
    running_stack,
    scrape_service,
    stage_deltas,
    triton_deltas,
)
from bench.plots import PLOT_DIR, overhead_chart

logger = logging.getLogger("bench.overhead")

DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-overhead"
MODEL_SIZES: Final = ("tiny", "mid")
# The mid UNet costs many times the tiny one per step on a CPU (bench/RESULTS.md, overhead): fewer
# steps keep a round short.
STEPS: Final = {"tiny": 20, "mid": 8}
IMAGE: Final = Size(256, 256)
COLD_START_TIMEOUT_S: Final = 600.0


# --------------------------------------------------------------------------------------------
# The floor: the exported graphs in-process, with the Triton model's session options


class LocalOnnxClient:
    """The pipeline's ``InferenceClient`` over onnxruntime sessions in this process.

    Each model's session is built with :mod:`export.triton_models.onnx_model`'s own
    ``session_options`` and malloc keeps freed memory between runs as that model's ``FreedMemory``
    has it, as in Triton, so the floor differs from the service only by the serving path.
    """

    def __init__(self, repository: Path, names: Sequence[str]) -> None:
        import onnxruntime as ort
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        from export.models.heap import FreedMemory
        from export.triton_models.onnx_model import session_options
        from server.settings import Settings

        # the service's MEMORY_RELEASE_S (this process's environment, as the service it is compared to)
        release_s = Settings.from_env(model_id=str(repository)).memory_release_s
        self.freed_memory = FreedMemory(release_s)
        self.sessions: dict[str, Any] = {}
        self.batch: dict[str, int] = {}
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}
        for name in names:
            config = text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())
            params = {k: v.string_value for k, v in config.parameters.items()}
            path = repository / name / "1" / params.get("onnx_file", "model.onnx")
            self.sessions[name] = ort.InferenceSession(
                str(path), session_options(params), providers=["CPUExecutionProvider"]
            )
            self.batch[name] = int(config.max_batch_size)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Base models only: the floor serves no LoRA variants (``parameters`` unused)."""
        if model in self.calls:
            self.calls[model].append(dict(inputs))
        results = self.sessions[model].run(list(outputs), dict(inputs))
        self.freed_memory.batch_done()
        return dict(zip(outputs, results, strict=True))

    async def max_batch_size(self, name: str) -> int:
        return self.batch[name]

    def shared(
        self, arrays: Mapping[str, np.ndarray], uses: int
    ) -> contextlib.nullcontext[Mapping[str, np.ndarray]]:
        """In-process: the arrays themselves."""
        return contextlib.nullcontext(arrays)


class Floor:
    """What ``--floor-worker`` runs: the service's pipeline code over :class:`LocalOnnxClient`."""

    def __init__(self, model_dir: Path, repository: Path) -> None:
        import torch

        from export.contract import specs
        from export.models.source import ModelSource
        from server.pipeline.model import DiffusionModel
        from server.pipeline.safety import SafetyChecker
        from server.settings import Settings

        torch.set_num_threads(
            Settings(model_id=str(model_dir)).torch_threads
        )  # as the service's scheduler math runs
        source = ModelSource(model_dir)
        names = [specs.UNET, specs.VAE_DECODER, *source.text_encoders]
        if (repository / specs.SAFETY_CHECKER).is_dir():
            names.append(specs.SAFETY_CHECKER)
        self.client = LocalOnnxClient(repository, names)
        self.model = DiffusionModel(source)
        from server.pipeline.generate import TextToImagePipeline

        self.pipeline = TextToImagePipeline(self.model, self.client)
        self.safety = (
            SafetyChecker.from_folders(
                self.client,
                model_dir / "feature_extractor",
                repository / specs.SAFETY_CHECKER / "feature_extractor",
            )
            if specs.SAFETY_CHECKER in names
            else None
        )
        self.unet_inputs: dict[str, np.ndarray] | None = None

    async def generate(self, body: dict[str, Any]) -> dict[str, float]:
        """One request as the service runs it after admission: pipeline, safety check, PNG."""
        from server.pipeline.images import png_data_url
        from server.pipeline.request import GenerationRequest

        stages: dict[str, float] = {"unet_step": 0.0}
        steps = 0

        def observe(stage: str, seconds: float, rows: int) -> None:
            nonlocal steps
            stages[stage] = stages.get(stage, 0.0) + seconds
            steps += stage == "unet_step"

        request = GenerationRequest(
            prompt=body["prompt"],
            negative_prompt="",
            height=body["height"],
            width=body["width"],
            guidance_scale=body["guidance_scale"],
            num_inference_steps=body["num_inference_steps"],
            num_images=1,
            seed=body["seed"],
        )
        started = time.perf_counter()
        result = await self.pipeline(request, None, observe)
        if self.safety is not None and body.get("safety_check", True):
            t0 = time.perf_counter()
            await self.safety.check(result.images)
            stages["safety_check"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.to_thread(lambda: [png_data_url(image) for image in result.images])
        stages["png_encode"] = time.perf_counter() - t0
        stages["latency"] = time.perf_counter() - started
        stages["step"] = stages["unet_step"] / max(steps, 1)
        return stages

    async def record_unet_inputs(self, body: dict[str, Any]) -> None:
        """The inputs of one UNet call of a real generation at this body's size and guidance."""
        from export.contract import specs

        self.client.calls[specs.UNET] = []
        await self.generate({**body, "num_inference_steps": 2})
        self.unet_inputs = self.client.calls.pop(specs.UNET)[-1]

    def graph(self, rows: int, calls: int) -> list[float]:
        """Seconds per call of the UNet graph alone on ``rows`` rows (the recorded rows, tiled)."""
        from export.contract import specs

        assert self.unet_inputs is not None
        base = len(next(iter(self.unet_inputs.values())))
        reps = -(-rows // base)
        feeds = {k: np.concatenate([v] * reps)[:rows] for k, v in self.unet_inputs.items()}
        session = self.client.sessions[specs.UNET]
        session.run(None, feeds)  # warm: first run at a new shape allocates
        seconds = []
        for _ in range(calls):
            t0 = time.perf_counter()
            session.run(None, feeds)
            seconds.append(time.perf_counter() - t0)
        return seconds


def floor_worker(model_dir: Path, repository: Path) -> int:
    """JSON lines on stdin -> JSON lines on stdout; the parent keeps this process for a whole run."""
    floor = Floor(model_dir, repository)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "record":
            asyncio.run(floor.record_unet_inputs(command["body"]))
            answer: dict[str, Any] = {"ok": True}
        elif op == "e2e":
            answer = {"requests": [asyncio.run(floor.generate(b)) for b in command["bodies"]]}
        elif op == "graph":
            answer = {"seconds": floor.graph(int(command["rows"]), int(command["calls"]))}
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)
    return 0


class FloorProcess:
    """The parent's handle on a ``--floor-worker`` subprocess."""

    def __init__(self, prepared: Prepared) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.overhead",
                "--floor-worker",
                str(prepared.model_dir),
                str(prepared.repository),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor worker exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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
    port = free_port()
    env = {
        **os.environ,
        "MODEL_ID": str(prepared.model_dir.resolve()),
        "MODEL_REPOSITORY": str(prepared.repository.resolve()),
        "STATE_DIR": str(state.resolve()),
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    env.pop("TRITON_URL", None)
    log = state.with_suffix(".log")
    state.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/health"
    with log.open("wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "server"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            while time.perf_counter() - started < COLD_START_TIMEOUT_S:
                if process.poll() is not None:
                    raise RuntimeError(f"the service exited with {process.returncode}; see {log}")
                with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                    if httpx.get(url, timeout=1).json()["status"] in ("OK", "IDLE"):
                        return time.perf_counter() - started
                time.sleep(0.05)
            raise TimeoutError(f"no /health OK within {COLD_START_TIMEOUT_S:g} s; see {log}")
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --------------------------------------------------------------------------------------------
# Report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


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
                floor_step = _ms(_median([p.floor_step_s for p in r.pairs]))
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
                f"| {r.size} | {r.steps} | {concurrency} | {_ms(step)} "
                f"| {_ms(_median([s.triton_queue_s for s in levels]))} "
                f"| {_ms(_median([s.triton_compute_s for s in levels]))} | {rows:.2f} | {_ms(graph)} "
                f"| {floor_step} | {step_ratio:.2f} | {_ms(overhead)} "
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


def _levels(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive integers")
    return values


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
    parser.add_argument("--concurrency", type=_levels, default=[1, 4], help="levels (default 1,4)")
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
