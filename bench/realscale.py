"""Real models at real size (issue 22): the export's time and peak memory, and one image through the
service against diffusers' pipeline, on full-size architectures saved as the Hub saves them.

- **models**: the full-size SD 1.5 (860M UNet, CLIP-L, ViT-L safety checker) or SDXL (2.57B UNet, CLIP-L
  and OpenCLIP-bigG) architectures with random weights (:mod:`bench.realscale_models`: the published
  configs in code, ``save_pretrained`` then ``save_pretrained(variant="fp16")``), built once into
  ``--models``.
- **export**: ``t2i-export MODEL --out REPO [--precision P]`` as a subprocess for each precision (python-onnx
  target, the ONNX-vs-torch check on), its wall time and the peak resident memory of its process tree
  (psutil, every 0.2 s), and the repository's size on disk.
- **serve** (``--family sd`` only): diffusers' ``StableDiffusionPipeline`` in this process on the same
  folder (fp32 named explicitly: the configs say float16), one image, with per-stage times (text encoder,
  UNet calls, VAE decode, safety checker) from hooks on its modules; then the bundled Triton and the
  service (bench/load.py's stack) on the fp32 repository: the time to OK, one image of the same request,
  the service's per-stage split from ``/metrics``, and the stack's peak memory.

Steps are few (``--steps 2``) so a run takes minutes; absolute times hold only for the machine they ran
on.  A command, not a test: CI keeps to the tiny models.

``python -m bench.realscale --family sd`` / ``python -m bench.realscale --family sdxl --no-serve``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from bench import log_to_stderr, machine
from bench.common import PROMPT, Body, Prepared, Size, running_stack, scrape_service, stage_deltas
from export.fixtures.service import REPO_ROOT

logger = logging.getLogger("bench.realscale")

DEFAULT_MODELS: Final = Path("/work/big")
FOLDERS: Final = {"sd": "sd15", "sdxl": "sdxl"}
SEED: Final = 1234
GIB: Final = 1024**3


class PeakMemory:
    """The peak of the summed resident memory of some process trees, sampled every ``interval_s``."""

    def __init__(self, pids: Callable[[], list[int]], interval_s: float = 0.2) -> None:
        self._pids = pids
        self._interval = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for pid in self._pids():
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for proc in (root, *root.children(recursive=True)):
                        with contextlib.suppress(psutil.Error):
                            total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class ExportResult:
    family: str
    precision: str
    seconds: float
    peak_rss_bytes: int
    repository_bytes: int
    largest_weights_bytes: int
    returncode: int
    command: str

    @property
    def factor(self) -> float:
        """Peak memory over the largest module's weights in the export's precision."""
        return self.peak_rss_bytes / self.largest_weights_bytes if self.largest_weights_bytes else 0.0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def largest_weights(model: Path, precision: str) -> int:
    """Bytes of the largest module's weights in ``precision`` (its fp16 files' size, doubled for fp32)."""
    sizes = []
    for folder in model.iterdir():
        fp16 = [p for p in folder.glob("*.fp16.safetensors")]
        if fp16:
            sizes.append(sum(p.stat().st_size for p in fp16))
    half = max(sizes, default=0)
    return half * 2 if precision == "fp32" else half


def run_export(family: str, model: Path, repo: Path, precision: str, log: Path) -> ExportResult:
    """``t2i-export MODEL --out REPO --precision P`` in a subprocess, timed, with its peak memory."""
    import shutil

    shutil.rmtree(repo, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "export.toolchain.cli",
        str(model),
        "--out",
        str(repo),
        "--precision",
        precision,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    logger.info("export %s %s: %s (log: %s)", family, precision, " ".join(command), log)
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        with PeakMemory(lambda: [proc.pid]) as peak:
            returncode = proc.wait()
    seconds = time.perf_counter() - start
    result = ExportResult(
        family,
        precision,
        seconds,
        peak.peak,
        _size(repo) if repo.exists() else 0,
        largest_weights(model, precision),
        returncode,
        f"t2i-export {model} --out {repo} --precision {precision}",
    )
    logger.info(
        "export %s %s: rc %d, %.0f s, peak %.2f GiB (%.2fx the largest module), repository %.2f GiB",
        family,
        precision,
        returncode,
        seconds,
        result.peak_rss_bytes / GIB,
        result.factor,
        result.repository_bytes / GIB,
    )
    return result


# --------------------------------------------------------------------------------------------
# One image: diffusers in-process, then the service


@dataclass
class ImageResult:
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0
    peak_rss_bytes: int = 0


@contextlib.contextmanager
def _timed(stages: dict[str, float], calls: dict[str, int], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        calls[name] = calls.get(name, 0) + 1


def run_diffusers(model: Path, body: Body) -> ImageResult:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    with PeakMemory(lambda: [os.getpid()]) as peak:
        pipe: Any = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter() - start
        result = ImageResult(0.0, startup_seconds=loaded)
        for name, module in (
            ("text_encoder", pipe.text_encoder),
            ("unet", pipe.unet),
            ("safety_check", pipe.safety_checker),
        ):
            _hook(module, name, result)
        decode = pipe.vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            with _timed(result.stages, result.calls, "vae"):
                return decode(*args, **kwargs)

        pipe.vae.decode = timed_decode
        t0 = time.perf_counter()
        pipe(
            prompt=PROMPT,
            height=body.size.height,
            width=body.size.width,
            num_inference_steps=body.steps,
            guidance_scale=body.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(SEED),
        )
        result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak.peak
    del pipe
    gc.collect()
    return result


def _hook(module: Any, name: str, result: ImageResult) -> None:
    starts: list[float] = []

    def pre(*_: Any) -> None:
        starts.append(time.perf_counter())

    def post(*_: Any) -> None:
        result.stages[name] = result.stages.get(name, 0.0) + time.perf_counter() - starts.pop()
        result.calls[name] = result.calls.get(name, 0) + 1

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def run_service(model: Path, repo: Path, work: Path, body: Body) -> ImageResult:
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pids: list[int] = []
    with (
        PeakMemory(lambda: list(pids)) as peak,
        running_stack(
            Prepared(model, repo), work, max_in_flight=1, max_pixels=body.size.width * body.size.height
        ) as stack,
    ):
        assert stack.service is not None and stack.triton is not None
        pids[:] = [p for p in (stack.service.pid, stack.triton.pid) if p]
        startup = time.perf_counter() - start
        before = scrape_service(stack.url)
        t0 = time.perf_counter()
        response = httpx.post(f"{stack.url}/text-to-image", json=body.json(SEED), timeout=3600)
        seconds = time.perf_counter() - t0
        response.raise_for_status()
        stages, _ = stage_deltas(before, scrape_service(stack.url))
    result = ImageResult(
        seconds, {k: v.seconds for k, v in stages.items()}, {k: v.count for k, v in stages.items()}
    )
    result.startup_seconds = startup
    result.peak_rss_bytes = peak.peak
    return result


# --------------------------------------------------------------------------------------------


def report(
    exports: list[ExportResult], ours: ImageResult | None, theirs: ImageResult | None, body: Body
) -> str:
    lines = [*machine(("torch", "diffusers", "transformers", "onnxruntime")), ""]
    lines += [
        "| model | precision | export time | peak RSS | largest module | peak / largest | repository |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in exports:
        status = "" if e.returncode == 0 else f" (rc {e.returncode})"
        cells = [
            e.family,
            e.precision,
            f"{e.seconds:.0f} s{status}",
            f"{e.peak_rss_bytes / GIB:.2f} GiB",
            f"{e.largest_weights_bytes / GIB:.2f} GiB",
            f"{e.factor:.2f}x",
            f"{e.repository_bytes / GIB:.2f} GiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if ours is not None and theirs is not None:
        lines += [
            "",
            f"One {body.size} image, {body.steps} steps, guidance {body.guidance_scale}, safety check on:",
            "",
            "| | start (load / to OK) | image | text encoder | UNet | VAE | safety check | peak RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r, unet in (
            ("service (python-onnx)", ours, "unet_step"),
            ("diffusers in-process", theirs, "unet"),
        ):
            s = r.stages
            cells = [
                name,
                f"{r.startup_seconds:.0f} s",
                f"{r.seconds:.1f} s",
                f"{s.get('text_encoder', 0):.1f} s",
                f"{s.get(unet, 0):.1f} s ({r.calls.get(unet, 0)} calls)",
                f"{s.get('vae', 0):.1f} s",
                f"{s.get('safety_check', 0):.1f} s",
                f"{r.peak_rss_bytes / GIB:.2f} GiB",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realscale", description=__doc__)
    parser.add_argument("--family", choices=tuple(FOLDERS), default="sd")
    parser.add_argument(
        "--models", type=Path, default=DEFAULT_MODELS, help="where the full-size folders live"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="repositories and logs (default: MODELS/work)"
    )
    parser.add_argument("--precisions", default="fp32,fp16", help="exports to run, in order")
    parser.add_argument("--no-serve", action="store_true", help="only the exports")
    parser.add_argument(
        "--repo", type=Path, default=None, help="serve this fp32 repository, exported before (no exports run)"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose, logger)
    from bench.realscale_models import build

    model = args.models / FOLDERS[args.family]
    if not (model / "model_index.json").is_file():
        build(args.family, model)
    work = args.work or args.models / "work"
    work.mkdir(parents=True, exist_ok=True)
    exports = [
        run_export(
            args.family, model, work / f"repo-{args.family}-{p}", p, work / f"export-{args.family}-{p}.log"
        )
        for p in ([] if args.repo else args.precisions.split(","))
    ]
    repo = args.repo or work / f"repo-{args.family}-fp32"
    ours = theirs = None
    body = Body(Size(args.size, args.size), args.steps, 7.5, True)
    serve = (
        args.family == "sd"
        and not args.no_serve
        and (args.repo is not None or any(e.precision == "fp32" and e.returncode == 0 for e in exports))
    )
    if serve:
        theirs = run_diffusers(model, body)
        ours = run_service(model, repo, work / "service", body)
    text = report(exports, ours, theirs, body)
    print(text)
    (work / f"realscale-{args.family}.json").write_text(
        json.dumps(
            {
                "exports": [asdict(e) for e in exports],
                "service": asdict(ours) if ours else None,
                "diffusers": asdict(theirs) if theirs else None,
            },
            indent=2,
        )
    )
    return 0 if all(e.returncode == 0 for e in exports) else 1


if __name__ == "__main__":
    sys.exit(main())
