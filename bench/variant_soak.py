"""Many distinct LoRA sets in a row through HTTP: disk, residency and memory stay bounded.

The service (in this process, with its bundled Triton) serves ``--sets`` requests, each with a LoRA
set no earlier request used (the same two LoRAs at new weights). After each request it records the
LoRA cache's bytes against ``LORA_CACHE_GB``, the resident variants against ``MAX_LORA_VARIANTS``,
and the RSS of the service process and of Triton with its python-backend stubs. For a sample of the
sets the image is compared with diffusers' ``load_lora_weights`` + ``set_adapters`` at the same
weights (within 2/255).

``python -m bench.variant_soak --size mid --sets 200``
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench import log_to_stderr, machine
from bench.variant_build import (
    DEFAULT_WORK,
    FORMATS,
    HTTP_BODY,
    SIZES,
    HttpService,
    Size,
    prepare,
)
from export.models.heap import limit_arenas
from server.settings import Settings

logger = logging.getLogger("bench.variant_soak")


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` and its descendants (Triton and its python-backend stubs)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss_bytes(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                stack += [int(c) for c in task.read_text().split()]
    return total


def decode(url: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def reference(model_dir: Path, loras: dict[Path, float]) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = cast(Any, StableDiffusionPipeline).from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=list(loras.values()))
    body = {k: v for k, v in HTTP_BODY.items() if k not in ("seed", "safety_check")}
    out = pipe(**body, generator=torch.Generator("cpu").manual_seed(int(HTTP_BODY["seed"])), output_type="np")
    return np.asarray((out.images[0] * 255).round().astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variant_soak", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", choices=SIZES)
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--cache-gb", type=float, default=2.0, help="LORA_CACHE_GB for the run")
    parser.add_argument("--max-variants", type=int, default=4, help="MAX_LORA_VARIANTS for the run")
    parser.add_argument("--samples", type=int, default=4, help="sets compared with diffusers")
    parser.add_argument(
        "--formats",
        default="diffusers,kohya",
        help="LoRA layouts in each set (the first one's weight varies)",
    )
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose, logger)
    # This process hosts the service: its heap gets the service's arena limit from the start, as
    # `python -m server` does before any worker thread exists (later, existing arenas stay in use).
    limit_arenas(Settings(model_id="-").malloc_arena_max)
    os.environ["MAX_LORA_VARIANTS"] = str(args.max_variants)  # read by the Triton model it starts
    prepared = prepare(cast(Size, args.size), args.work)
    formats = [f for f in args.formats.split(",") if f in FORMATS]
    names = {fmt: f"{args.size}-{fmt}" for fmt in formats}
    sample_at = set(np.linspace(0, args.sets - 1, args.samples).round().astype(int).tolist())
    load_before = os.getloadavg()
    started = time.perf_counter()
    service = HttpService(prepared, args.work)
    service.settings = service.settings.with_overrides(
        lora_cache_gb=args.cache_gb, max_lora_variants=args.max_variants
    )
    rows: list[dict[str, float]] = []
    samples: list[tuple[dict[str, float], np.ndarray]] = []
    worst = 0
    import httpx

    # One client for the run, as an orchestrator keeps its connection (a client per request would
    # add its own TLS contexts to this process's RSS).
    with service, httpx.Client(timeout=900) as client:
        backend = service.app.state.backend
        variants = service.app.state.supervisor.loaded.variants
        for i in range(args.sets):
            weights = {
                names[fmt]: round(0.2 + 0.004 * i, 6) if j == 0 else 0.5 for j, fmt in enumerate(formats)
            }
            request_started = time.perf_counter()
            response = client.post(
                f"{service.url}/text-to-image", json={**HTTP_BODY, "loras": json.dumps(weights)}
            )
            response.raise_for_status()
            seconds = time.perf_counter() - request_started
            triton_pid = backend.triton.pid if backend.triton is not None else None
            row = {
                "set": i,
                "seconds": seconds,
                "cache_bytes": variants.cache.used_bytes,
                "resident": len(variants.loaded()),
                "service_rss": rss_bytes(os.getpid()),
                "triton_rss": tree_rss(triton_pid) if triton_pid else 0,
            }
            if i in sample_at:
                samples.append((weights, decode(response.json()["images"][0]["url"])))
            rows.append(row)
            logger.info("set %d: %s", i, {k: v for k, v in row.items() if k != "set"})
    elapsed = time.perf_counter() - started
    # after the run, so diffusers' pipelines do not count in the service's RSS
    for weights, image in samples:
        expected = reference(
            prepared.model_dir, {prepared.loras[fmt]: weights[names[fmt]] for fmt in formats}
        )
        worst = max(worst, int(np.abs(image.astype(int) - expected.astype(int)).max()))
    load_after = os.getloadavg()
    limit = args.cache_gb * 2**30

    def mb(n: float) -> str:
        return f"{n / 2**20:.0f}"

    def window(key: str, lo: int, hi: int) -> str:
        values = [r[key] for r in rows[lo:hi]]
        return mb(statistics.median(values)) if values else "-"

    n = len(rows)
    lines = [
        "command: python -m bench.variant_soak " + " ".join(sys.argv[1:] if argv is None else argv),
        *machine(("torch", "onnxruntime", "diffusers")),
        f"load average (1/5/15 min) at start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"at end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; total {elapsed:.0f} s",
        "",
        "| sets | LORA_CACHE_GB | max cache MB | MAX_LORA_VARIANTS | max resident | request s median (p95) "
        "| service RSS MB sets 5-15 / last 10 | Triton+stubs RSS MB sets 5-15 / last 10 "
        "| images vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {n} | {args.cache_gb:g} | {mb(max(r['cache_bytes'] for r in rows))} (bound {mb(limit)}) "
        f"| {args.max_variants} | {max(r['resident'] for r in rows):.0f} "
        f"| {statistics.median(r['seconds'] for r in rows):.2f} "
        f"({sorted(r['seconds'] for r in rows)[int(0.95 * (n - 1))]:.2f}) "
        f"| {window('service_rss', 5, 15)} / {window('service_rss', n - 10, n)} "
        f"| {window('triton_rss', 5, 15)} / {window('triton_rss', n - 10, n)} "
        f"| max diff {worst}/255 over {len(sample_at)} sets |",
    ]
    print("\n".join(lines))
    ok = (
        max(r["cache_bytes"] for r in rows) <= limit and max(r["resident"] for r in rows) <= args.max_variants
    )
    return 0 if ok and worst <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
