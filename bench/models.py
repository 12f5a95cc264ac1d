"""``python -m bench models``: several models behind one service (MODEL_IDS), in one run.

1. **Mixed load**: the tiny SD, SDXL and FLUX models behind one service (all pinned, one bundled
   Triton) against one service per model (three services, three Tritons, the same machine), each
   model driven by its own closed-loop clients at the same time; images/s and p95 latency per model.
2. **Cold first request**, on the tiny and the mid model: the first request to a model that is not
   resident (the service loads it: Triton's repository API, then its pipeline), against the same
   model's Triton models loaded alone through the repository API on a bare Triton, and against the
   reference runner's model switch (diffusers ``from_pretrained`` + first image, in-process, imports
   already done).  The overhead is ``first - warm request - Triton load``; the budget is 1 s.
3. **Soak**: the three models with ``MODEL_MEMORY_GB`` set to hold two of them (from their measured
   sizes), none pinned, at least 300 requests for models drawn at random; the service's resident
   total and the Triton stubs' real RSS are sampled throughout, against the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

from bench import log_to_stderr, machine
from bench.common import HTTP_TIMEOUT_S, Body, LevelResult, Prepared, Size, drive, percentile
from export.fixtures.service import ServiceProcess

logger = logging.getLogger("bench.models")

DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-models"
FAMILIES: Final = ("sd", "sdxl", "flux")
GB: Final = 2**30
STARTUP_S: Final = 600.0


def prepare(work: Path, name: str) -> Prepared:
    """A model folder (``sd``, ``sdxl``, ``flux``: the tiny ones; ``mid``: bench/mid_model.py) and its
    python-onnx repository, cached in ``work``."""
    from export.fixtures.tiny import build_tiny_model
    from export.toolchain.options import RepositoryOptions
    from export.toolchain.repository import export_repository

    if name == "mid":
        from bench.mid_model import build_mid_model

        model_dir = build_mid_model(work)
    else:
        model_dir = build_tiny_model(name, work / "models" / f"tiny-{name}")  # type: ignore[arg-type]
    repository = export_repository(
        str(model_dir), work / "repositories" / name, RepositoryOptions(check=False)
    )
    return Prepared(model_dir.resolve(), repository.resolve())


def model_id(prepared: Prepared) -> str:
    return str(prepared.model_dir)


def entries(models: list[Prepared]) -> str:
    return ",".join(f"{model_id(p)}={p.repository}" for p in models)


@contextlib.contextmanager
def service(work: Path, name: str, env: dict[str, str]) -> Iterator[ServiceProcess]:
    """``python -m server`` on its bundled Triton (STATE_DIR and MODEL_REPOSITORY of its own)."""
    base = {
        "MODEL_REPOSITORY": str((work / f"service-{name}").resolve()),
        "STATE_DIR": str((work / f"state-{name}").resolve()),
        "MAX_IN_FLIGHT": "8",
        "MAX_QUEUE": "64",
        "REQUEST_TIMEOUT_S": "600",
    }
    Path(base["MODEL_REPOSITORY"]).mkdir(parents=True, exist_ok=True)
    env = {**base, **env}
    unset = [
        n
        for n in ("MODEL_ID", "MODEL_IDS", "PINNED_MODEL_IDS", "MODEL_MEMORY_GB", "TRITON_URL")
        if n not in env
    ]
    process = ServiceProcess(env, work / f"{name}.log", unset=unset, ready_timeout_s=STARTUP_S)
    with process:
        yield process


def model_url(base: str, prepared: Prepared) -> str:
    return f"{base}/models/{model_id(prepared).strip('/')}"


def scrape(url: str, name: str) -> dict[str, float]:
    """``{model: value}`` of one per-model series on ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels.get("model", "")] = sample.value
    return found


def triton_rss(service_pid: int) -> int:
    """Resident memory of the service's bundled Triton and its stubs."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(service_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return total


# -- 1. mixed load --------------------------------------------------------------------------------


async def mixed(urls: list[str], body: Body, concurrency: int, requests: int) -> list[LevelResult]:
    """Every model's load at once: ``concurrency`` clients and ``requests`` requests per model."""
    return list(
        await asyncio.gather(*(drive(u, body, concurrency, requests, 1000 * i) for i, u in enumerate(urls)))
    )


def measure_mixed(
    work: Path, models: list[Prepared], body: Body, concurrency: int, requests: int
) -> dict[str, Any]:
    env = {"MODEL_IDS": entries(models), "PINNED_MODEL_IDS": ",".join(model_id(p) for p in models)}
    with service(work, "mixed-one", env) as one:
        asyncio.run(mixed([model_url(one.url, p) for p in models], body, 1, 1))  # warm
        together = asyncio.run(mixed([model_url(one.url, p) for p in models], body, concurrency, requests))
        one_rss = triton_rss(one.pid or 0)
    with contextlib.ExitStack() as stack:
        singles = [
            stack.enter_context(
                service(work, f"mixed-{i}", {"MODEL_ID": model_id(p), "MODEL_REPOSITORY": str(p.repository)})
            )
            for i, p in enumerate(models)
        ]
        asyncio.run(mixed([s.url for s in singles], body, 1, 1))
        apart = asyncio.run(mixed([s.url for s in singles], body, concurrency, requests))
        apart_rss = sum(triton_rss(s.pid or 0) for s in singles)
    return {"together": together, "apart": apart, "one_rss": one_rss, "apart_rss": apart_rss}


# -- 2. cold first request ------------------------------------------------------------------------


def triton_load_alone(work: Path, prepared: Prepared) -> float:
    """Seconds to load the model's Triton models side by side on a bare bundled Triton."""
    from server.engines import repository_models
    from server.triton.launcher import BundledTriton, TritonLaunchConfig

    config = TritonLaunchConfig(
        model_repository=prepared.repository,
        state_dir=(work / "state-alone").resolve(),
        explicit_model_control=True,
        load_all=False,
        startup_timeout_s=STARTUP_S,
    )
    with BundledTriton(config) as triton:
        parts = repository_models(prepared.repository)

        async def load_all() -> None:
            async with httpx.AsyncClient(base_url=triton.http_url, timeout=HTTP_TIMEOUT_S) as client:
                answers = await asyncio.gather(
                    *(client.post(f"/v2/repository/models/{p}/load") for p in parts)
                )
            bad = [a.text for a in answers if a.status_code != 200]
            if bad:
                raise RuntimeError(f"Triton did not load {prepared.repository}: {bad}")

        started = time.perf_counter()
        asyncio.run(load_all())
        return time.perf_counter() - started


def diffusers_switch(prepared: Prepared, body: Body) -> float:
    """The reference runner's model switch: ``from_pretrained`` + the first image (imports done)."""
    import torch
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    pipe: Any = DiffusionPipeline.from_pretrained(prepared.model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe(
        prompt="a cat",
        height=body.size.height,
        width=body.size.width,
        num_inference_steps=body.steps,
        guidance_scale=body.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    return time.perf_counter() - started


def timed_post(url: str, body: Body, seed: int) -> float:
    started = time.perf_counter()
    answer = httpx.post(f"{url}/text-to-image", json=body.json(seed), timeout=HTTP_TIMEOUT_S)
    if answer.status_code != 200:
        raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}")
    return time.perf_counter() - started


def measure_cold(
    work: Path, name: str, target: Prepared, pin: Prepared, body: Body, repeats: int
) -> dict[str, Any]:
    """Medians over ``repeats`` of the cold first request, the warm one after it, the Triton load
    alone and the diffusers switch."""
    rows: dict[str, list[float]] = {"first": [], "warm": [], "triton": [], "diffusers": []}
    diffusers_switch(pin, body)  # the imports and torch's first call, done before the timed switches
    for i in range(repeats):
        rows["triton"].append(triton_load_alone(work, target))
        env = {
            "MODEL_IDS": entries([pin, target]),
            "PINNED_MODEL_IDS": model_id(pin),
            "SAFETY_CHECKER": "off",
        }
        with service(work, f"cold-{name}-{i}", env) as running:
            url = model_url(running.url, target)
            rows["first"].append(timed_post(url, body, i))
            rows["warm"].append(timed_post(url, body, i))
        rows["diffusers"].append(diffusers_switch(target, body))
    result = {k: statistics.median(v) for k, v in rows.items()}
    result["overhead"] = result["first"] - result["warm"] - result["triton"]
    return result


# -- 3. soak --------------------------------------------------------------------------------------


@dataclass
class Soak:
    budget: int
    requests: int
    errors: list[str]
    latencies: dict[str, list[float]]
    peak_accounted: int
    peak_rss: int
    baseline_rss: int
    loads: dict[str, float]
    evictions: dict[str, float]
    wall_s: float


def two_of_three(sizes: list[int]) -> int:
    """A budget that holds the two largest and not all three: their sum and half the smallest."""
    ordered = sorted(sizes)
    return ordered[1] + ordered[2] + ordered[0] // 2


def measure_soak(work: Path, models: list[Prepared], body: Body, requests: int, concurrency: int) -> Soak:
    env = {"MODEL_IDS": entries(models), "PINNED_MODEL_IDS": "none"}
    with service(work, "soak-sizes", env) as sizing:
        for p in models:
            timed_post(model_url(sizing.url, p), body, 0)
        held = scrape(sizing.url, "t2i_model_memory_bytes")
    budget = two_of_three([int(held[model_id(p)]) for p in models])
    with service(work, "soak", {**env, "MODEL_MEMORY_GB": f"{budget / GB:.6f}"}) as running:
        baseline = triton_rss(running.pid or 0)
        draws = random.Random(0)
        order = [draws.choice(models) for _ in range(requests)]
        latencies: dict[str, list[float]] = {model_id(p): [] for p in models}
        errors: list[str] = []
        peaks = {"accounted": 0, "rss": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                resident = scrape(running.url, "t2i_model_resident")
                held = scrape(running.url, "t2i_model_memory_bytes")
                peaks["accounted"] = max(
                    peaks["accounted"], int(sum(v for m, v in held.items() if resident.get(m)))
                )
                peaks["rss"] = max(peaks["rss"], triton_rss(running.pid or 0) - baseline)

        async def soak() -> None:
            queue = list(enumerate(order))

            async def worker(client: httpx.AsyncClient) -> None:
                while queue:
                    index, prepared = queue.pop(0)
                    started = time.perf_counter()
                    answer = await client.post(
                        f"{model_url(running.url, prepared)}/text-to-image", json=body.json(index)
                    )
                    if answer.status_code == 200:
                        latencies[model_id(prepared)].append(time.perf_counter() - started)
                    else:
                        errors.append(f"HTTP {answer.status_code}: {answer.text[:200]}")

            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
                await asyncio.gather(*(worker(client) for _ in range(concurrency)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        asyncio.run(soak())
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        return Soak(
            budget,
            requests,
            errors,
            latencies,
            peaks["accounted"],
            peaks["rss"],
            baseline,
            scrape(running.url, "t2i_model_loads_total"),
            scrape(running.url, "t2i_model_evictions_total"),
            wall,
        )


# -- report ---------------------------------------------------------------------------------------


def report(
    mixed: dict[str, Any] | None, cold: dict[str, dict[str, Any]], soak: Soak | None, names: list[str]
) -> str:
    lines = []
    if mixed is not None:
        lines += [
            "## mixed load: one service for the three models vs one service per model (same run)",
            "",
            "| model | one service: images/s | p95 s | one per model: images/s | p95 s "
            "| images/s ratio | p95 ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, t, a in zip(names, mixed["together"], mixed["apart"], strict=True):
            tp, ap = percentile(t.latencies, 95), percentile(a.latencies, 95)
            lines.append(
                f"| {name} | {t.images_per_s:.2f} | {tp:.3f} | {a.images_per_s:.2f} | {ap:.3f} | "
                f"{t.images_per_s / a.images_per_s:.2f} | {tp / ap:.2f} |"
            )
        errors = sum(len(r.errors) for r in (*mixed["together"], *mixed["apart"]))
        lines += [
            "",
            f"Triton RSS: one {mixed['one_rss'] / GB:.2f} GB, three {mixed['apart_rss'] / GB:.2f} GB; "
            f"errors {errors}",
            "",
        ]
    if cold:
        lines += [
            "## cold first request (medians)",
            "",
            "| model | first request s | warm request s | Triton load alone s "
            "| overhead s (first - warm - load) | diffusers from_pretrained + first image s |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in cold.items():
            lines.append(
                f"| {name} | {c['first']:.2f} | {c['warm']:.2f} | {c['triton']:.2f} | {c['overhead']:.2f} | "
                f"{c['diffusers']:.2f} |"
            )
        lines.append("")
    if soak is not None:
        done = sum(len(v) for v in soak.latencies.values())
        lines += [
            f"## soak: {soak.requests} requests, budget {soak.budget / GB:.3f} GB (two of three)",
            "",
            f"- answered 200: {done}, errors: {len(soak.errors)} in {soak.wall_s:.0f} s",
            f"- peak resident total as the service accounts it: {soak.peak_accounted / GB:.3f} GB "
            f"({soak.peak_accounted / soak.budget:.0%} of the budget)",
            f"- peak Triton RSS above its start: {soak.peak_rss / GB:.3f} GB "
            f"({soak.peak_rss / soak.budget:.0%})",
            f"- loads {dict(soak.loads)}, evictions {dict(soak.evictions)}",
        ]
        for model, values in soak.latencies.items():
            lines.append(
                f"- {Path(model).name}: {len(values)} requests, p50 {percentile(values, 50):.3f} s, "
                f"p95 {percentile(values, 95):.3f} s"
            )
        lines += [f"- first errors: {soak.errors[:3]}"] if soak.errors else []
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="mixed,cold,soak", help="comma-separated of mixed, cold, soak")
    parser.add_argument("--cold-sizes", default="tiny,mid", help="models of the cold part: tiny, mid")
    parser.add_argument("--concurrency", type=int, default=2, help="clients per model in the mixed load")
    parser.add_argument("--requests", type=int, default=20, help="requests per model in the mixed load")
    parser.add_argument("--repeats", type=int, default=3, help="cold starts per model")
    parser.add_argument("--soak-requests", type=int, default=300)
    parser.add_argument("--size", type=Size.parse, default=Size(64, 64), help="image size (default 64x64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of models and repositories")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose, logger)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"mixed", "cold", "soak"} or (args.soak_requests < 300 and "soak" in parts):
        parser.error("--parts takes mixed, cold, soak; --soak-requests at least 300")
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    body = Body(args.size, args.steps, 7.5, False)
    models = [prepare(args.work, f) for f in FAMILIES]
    mixed_result = (
        measure_mixed(args.work, models, body, args.concurrency, args.requests) if "mixed" in parts else None
    )
    cold = {}
    if "cold" in parts:
        for size in [s.strip() for s in args.cold_sizes.split(",") if s.strip()]:
            target = models[0] if size == "tiny" else prepare(args.work, "mid")
            cold[size] = measure_cold(args.work, size, target, models[2], body, args.repeats)
    soak = measure_soak(args.work, models, body, args.soak_requests, 4) if "soak" in parts else None
    print(f"command: python -m bench models {' '.join(sys.argv[2:] if argv is None else argv)}")
    print("\n".join(machine(("torch", "onnxruntime", "diffusers", "nvidia-pytriton"))))
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total runtime {time.perf_counter() - started:.0f} s\n")
    print(report(mixed_result, cold, soak, list(FAMILIES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
