"""LoRA variant cost: the service's build and first request against diffusers' load + fuse, same run.

For each model size (``tiny``: :func:`export.fixtures.tiny.build_tiny_model`; ``mid``: an SD 1.5 architecture
at reduced width, random weights under fixed seeds: :func:`bench.mid_model.build_mid_model`) and each LoRA
layout (diffusers/PEFT and kohya, from :func:`export.fixtures.tiny_lora.build_tiny_lora`), interleaved
per repeat:

- **variant build**: :func:`export.models.variant_build.plan_variant` + :func:`write_variant`, the pure build
  the service runs on a LoRA set's first request: read and check the LoRA, then for each base tensor
  it touches (read alone from the exported ONNX file) merge and write it into the override file. A
  fresh key per repeat; the files are deleted after each repeat. The base index (where each
  initializer's bytes are) is built once per service and reported separately.
- **read overrides**: what the python-onnx model does on a new variant's first batch: read its
  override tensors (:class:`export.triton_models.onnx_model.VariantOverrides`). Its overridable
  sessions (the base graph with weights as inputs, for the UNet and the text encoder) open once per
  model, timed apart; and one UNet call on that session fed the overrides is timed against the base session.
- **diffusers load + fuse**: the baseline a user would pick instead: ``pipe.load_lora_weights(path)``
  + ``pipe.fuse_lora()`` on a loaded ``StableDiffusionPipeline`` (then ``unfuse_lora`` +
  ``unload_lora_weights``, untimed).
- **first request through HTTP** (unless ``--no-http``): the service with its bundled Triton; per
  repeat a new LoRA set (a new weight) is requested, then the same set again: the extra latency of
  the first request is the difference. diffusers' load + fuse runs in the same loop (Triton idle).

Disk per variant is the override files' size against the bytes of the tensors they change.
Models, repositories (exported with ``RepositoryOptions(check=False)``) and LoRA files are cached in
``--work``, so a rerun only measures. Absolute figures hold only for the machine they ran on.

``python -m bench.variant_build --sizes tiny,mid --repeats 3``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from bench import log_to_stderr, machine
from bench.mid_model import build_mid_model
from bench.mid_model import logger as mid_model_logger
from bench.variant_report import Row, report

logger = logging.getLogger("bench.variant_build")

Size = Literal["tiny", "mid"]
SIZES: Final[tuple[Size, ...]] = ("tiny", "mid")
Format = Literal["diffusers", "kohya"]
FORMATS: Final[tuple[Format, ...]] = ("diffusers", "kohya")
DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-variant-build"
LORA_SEED: Final = 7
TEXT_ENCODERS: Final = ("text_encoder",)


# --------------------------------------------------------------------------------------------
# Models, repositories and LoRA files (cached in --work)


@dataclass(frozen=True)
class Prepared:
    size: Size
    model_dir: Path
    repository: Path
    loras: dict[Format, Path]


def build_lora(size: Size, fmt: Format, model_dir: Path, work: Path) -> Path:
    """A random LoRA (UNet + text encoder) for ``model_dir`` in ``fmt``, built once into ``work``."""
    from export.fixtures.tiny_lora import build_tiny_lora

    folder = work / "loras" / f"{size}-{fmt}"
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        return folder
    staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_lora("sd", staging, fmt, LORA_SEED, model_dir=model_dir, text_encoder=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def prepare(size: Size, work: Path) -> Prepared:
    from export.fixtures.tiny import build_tiny_model
    from export.toolchain.options import RepositoryOptions
    from export.toolchain.repository import export_repository

    started = time.perf_counter()
    if size == "tiny":
        model_dir = build_tiny_model("sd", work / "models" / "tiny-sd")
    else:
        model_dir = build_mid_model(work)
    repository = work / "repositories" / size
    # check=False: no ONNX-vs-torch comparison at export (the test suite does that for the tiny model).
    export_repository(str(model_dir), repository, RepositoryOptions(check=False))
    remove_stale_variants(repository)
    loras = {fmt: build_lora(size, fmt, model_dir, work) for fmt in FORMATS}
    logger.info("%s: model, repository and LoRAs ready in %.1f s", size, time.perf_counter() - started)
    return Prepared(size, model_dir, repository, loras)


def remove_stale_variants(repository: Path) -> None:
    """Whole-model variant folders (``unet__<key>``) of the earlier design; override files an
    interrupted run left are removed by the service's cache scan (no record names them)."""
    for path in repository.iterdir():
        if "__" in path.name and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class VariantBuilder:
    """The service's pure variant build on one repository, with the python-onnx model's session."""

    def __init__(self, prepared: Prepared) -> None:
        from export.models.variant_build import BaseIndex

        self.repository = prepared.repository
        self.base = BaseIndex(prepared.repository)
        started = time.perf_counter()
        for model in ("unet", *TEXT_ENCODERS):
            self.base.state(model)
        self.index_s = time.perf_counter() - started

    def build(self, lora_id: str, path: Path) -> tuple[str, float, float, int, int, int]:
        """(key, plan s, merge+write s, merged params, changed bytes, file bytes) for a fresh key."""
        from export.models.variant_build import LoraInput, plan_variant, write_variant

        key = uuid.uuid4().hex[:16]
        inputs = [LoraInput(_lora_file(path), lora_id, 1.0)]
        started = time.perf_counter()
        plan = plan_variant(self.base, ("unet", *TEXT_ENCODERS), inputs)
        planned = time.perf_counter()
        files = write_variant(self.repository, key, plan)
        written = time.perf_counter()
        params = sum(len(t) for t in plan.terms.values())
        on_disk = sum(f.stat().st_size for f in files.values())
        return key, planned - started, written - planned, params, plan.tensor_bytes(), on_disk

    def open_overridable(self) -> float:
        """Seconds to open the overridable sessions (UNet + text encoder): once per model, on the
        first variant request the model serves."""
        import onnxruntime as ort

        from export.triton_models.onnx_model import VariantOverrides

        started = time.perf_counter()
        self.variants = {
            model: VariantOverrides(
                self.repository / model / "variants",
                self.repository / model / "1" / "model.onnx",
                ort.SessionOptions,
                1,
            )
            for model in ("unet", *TEXT_ENCODERS)
        }
        for variants in self.variants.values():
            variants.session = variants._overridable_session()
        return time.perf_counter() - started

    def session(self, key: str) -> float:
        """Seconds for what ``model.py`` does on a new variant's first batch: read its overrides."""
        started = time.perf_counter()
        for model, variants in self.variants.items():
            if (self.repository / model / "variants" / f"{key}.safetensors").is_file():
                variants.get(key)
        return time.perf_counter() - started

    def step_seconds(self, key: str, repeats: int) -> tuple[float, float]:
        """Median seconds of one UNet call (batch 2, 64x64 latents) on the base session and on the
        overridable one fed the variant's overrides."""
        import numpy as np
        import onnxruntime as ort

        unet = self.variants["unet"]
        session, overrides = unet.get(key)
        base = ort.InferenceSession(str(unet.onnx_path), providers=["CPUExecutionProvider"])
        hidden = base.get_inputs()[2].shape[2]
        rng = np.random.default_rng(0)
        feeds = {
            "sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32),
        }
        times: dict[str, list[float]] = {"base": [], "variant": []}
        for _ in range(repeats + 1):  # the first round warms up
            for name, run in (
                ("base", lambda: base.run(None, feeds)),
                ("variant", lambda: session.run(None, {**feeds, **overrides})),
            ):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        return statistics.median(times["base"][1:]), statistics.median(times["variant"][1:])

    def remove(self, key: str) -> None:
        for model in ("unet", *TEXT_ENCODERS):
            (self.repository / model / "variants" / f"{key}.safetensors").unlink(missing_ok=True)


def _lora_file(path: Path) -> Path:
    return path if path.is_file() else next(path.glob("*.safetensors"))


class DiffusersBaseline:
    """An in-process ``StableDiffusionPipeline``, loaded once; LoRAs are loaded, fused and dropped."""

    def __init__(self, model_dir: Path) -> None:
        from diffusers import StableDiffusionPipeline

        pipe = cast(Any, StableDiffusionPipeline).from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self._count = 0

    def params(self) -> tuple[int, int]:
        def count(module: Any) -> int:
            return sum(p.numel() for p in module.parameters())

        return count(self.pipe.unet), count(self.pipe.text_encoder)

    def run(self, path: Path) -> tuple[float, float, float]:
        """(load_lora_weights, fuse_lora, unfuse_lora + unload_lora_weights) in seconds."""
        self._count += 1
        started = time.perf_counter()
        self.pipe.load_lora_weights(str(path), adapter_name=f"bench{self._count}")
        loaded = time.perf_counter()
        self.pipe.fuse_lora()
        fused = time.perf_counter()
        self.pipe.unfuse_lora()
        self.pipe.unload_lora_weights()
        return loaded - started, fused - loaded, time.perf_counter() - fused


class HttpService:
    """The service on uvicorn (in this process, a thread) with its bundled Triton on the repository."""

    def __init__(self, prepared: Prepared, work: Path, lora_preload: bool = False) -> None:
        from export.fixtures.service import LOOPBACK, free_port
        from server.settings import Settings

        port = free_port()
        self.url = f"http://{LOOPBACK}:{port}"
        self.settings = Settings(
            model_id=str(prepared.model_dir),
            model_repository=prepared.repository,
            state_dir=work / f"state-{prepared.size}",
            lora_dir=work / "loras",
            lora_hub=False,
            lora_preload=lora_preload,
            host=LOOPBACK,
            port=port,
            startup_timeout_s=900.0,
            request_timeout_s=900.0,
        )
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> HttpService:
        from export.fixtures.service import serving_in_thread, wait_for_health
        from server.app import create_app

        self.app = create_app(self.settings)
        with self.stack:
            self.stack.enter_context(
                serving_in_thread(self.app, self.settings.port, lifespan="auto", join_timeout_s=120)
            )
            wait_for_health(self.url, "OK", timeout_s=900, poll_s=0.5)
            self.stack = self.stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def request(self, loras: dict[str, float]) -> float:
        import httpx

        body = {**HTTP_BODY, "loras": json.dumps(loras)}
        started = time.perf_counter()
        response = httpx.post(f"{self.url}/text-to-image", json=body, timeout=900)
        seconds = time.perf_counter() - started
        response.raise_for_status()
        return seconds


# A small request: the first request's extra latency is what is measured, not the generation.
HTTP_BODY: Final = {
    "prompt": "a photo of a cat",
    "height": 64,
    "width": 64,
    "num_inference_steps": 2,
    "guidance_scale": 7.5,
    "seed": 1,
    "safety_check": False,
}


def measure(
    prepared: Prepared, repeats: int, work: Path, http: bool, lora_preload: bool = False
) -> list[Row]:
    """Builds, sessions and diffusers' load + fuse interleaved; then (service up) first requests
    interleaved with diffusers' load + fuse again."""
    from export.models.lora import load_lora

    builder = VariantBuilder(prepared)
    overridable_s = builder.open_overridable()
    baseline = DiffusersBaseline(prepared.model_dir)
    unet_params, te_params = baseline.params()
    onnx_bytes = sum(
        (prepared.repository / n / "1" / "model.onnx").stat().st_size for n in ("unet", *TEXT_ENCODERS)
    )
    rows: list[Row] = []
    for fmt in FORMATS:
        path = prepared.loras[fmt]
        lora = load_lora(path)
        row = Row(
            size=prepared.size,
            fmt=fmt,
            unet_params=unet_params,
            text_encoder_params=te_params,
            onnx_bytes=onnx_bytes,
            lora_bytes=dir_bytes(path),
            lora_layers={c: len(lora.layers[c]) for c in lora.components},
            index_s=builder.index_s,
            overridable_s=overridable_s,
        )
        lora_id = f"bench/{prepared.size}-{fmt}"
        # Warm-up (untimed): first-call imports and allocations, page cache.
        key, *_ = builder.build(lora_id, path)
        builder.session(key)
        builder.remove(key)
        baseline.run(path)
        for i in range(repeats):
            key, plan_s, write_s, row.merged_params, row.changed_bytes, row.file_bytes = builder.build(
                lora_id, path
            )
            row.plan.append(plan_s)
            row.write.append(write_s)
            row.build.append(plan_s + write_s)
            gc.collect()
            row.session.append(builder.session(key))
            if i == repeats - 1:
                row.step_base, row.step_variant = builder.step_seconds(key, 3)
            builder.remove(key)
            gc.collect()
            load, fuse, _ = baseline.run(path)
            row.load.append(load)
            row.fuse.append(fuse)
            gc.collect()
            logger.info(
                "%s %s repeat %d/%d: build %.3f s, session %.3f s, diffusers load %.3f + fuse %.3f s",
                prepared.size,
                fmt,
                i + 1,
                repeats,
                plan_s + write_s,
                row.session[-1],
                load,
                fuse,
            )
        rows.append(row)
    if http:
        with HttpService(prepared, work, lora_preload) as service:
            for row in rows:
                name = f"{prepared.size}-{row.fmt}"
                path = prepared.loras[cast(Format, row.fmt)]
                row.service_first = service.request({name: 0.25})  # this LoRA's first use
                for i in range(repeats):
                    loras = {name: round(0.3 + 0.01 * i + 0.001 * len(rows), 4)}  # a new set each time
                    row.first_request.append(service.request(loras))
                    row.loaded_request.append(service.request(loras))
                    load, fuse, _ = baseline.run(path)
                    row.http_load_fuse.append(load + fuse)
                    logger.info(
                        "%s %s HTTP %d/%d: first %.3f s, loaded %.3f s, diffusers load+fuse %.3f s",
                        row.size,
                        row.fmt,
                        i + 1,
                        repeats,
                        row.first_request[-1],
                        row.loaded_request[-1],
                        load + fuse,
                    )
    del baseline
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.variant_build",
        description="Time LoRA variants (build, session, first request) against diffusers' load+fuse.",
    )
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated, of: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size and LoRA layout")
    parser.add_argument(
        "--mid-repeats", type=int, default=None, help="repeats for the mid model (default: --repeats)"
    )
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="cache of models, repositories, LoRAs"
    )
    parser.add_argument("--no-http", action="store_true", help="skip the first requests through HTTP")
    parser.add_argument(
        "--lora-preload", action="store_true", help="the service with LORA_PRELOAD=true (HTTP part)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose, logger)
    mid_model_logger.setLevel(logging.INFO)  # its build's progress, as this benchmark's own
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        parser.error(f"unknown size(s) {', '.join(unknown)}; expected some of {', '.join(SIZES)}")
    if args.repeats < 1 or (args.mid_repeats is not None and args.mid_repeats < 1):
        parser.error("repeats must be at least 1")

    started = time.perf_counter()
    load_before = os.getloadavg()
    rows: list[Row] = []
    for size in cast(list[Size], sizes):
        repeats = args.mid_repeats if size == "mid" and args.mid_repeats is not None else args.repeats
        prepared = prepare(size, args.work)
        rows += measure(prepared, repeats, args.work, http=not args.no_http, lora_preload=args.lora_preload)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started

    header = [
        "command: python -m bench.variant_build " + " ".join(sys.argv[1:] if argv is None else argv),
        *machine(("torch", "onnx", "onnxruntime", "diffusers", "peft")),
        f"load average (1/5/15 min) at start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"at end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}",
        f"total runtime {elapsed:.0f} s (model builds and exports included unless cached in {args.work})",
    ]
    repeats_text = (
        str(args.repeats) if args.mid_repeats is None else f"{args.repeats} (mid: {args.mid_repeats})"
    )
    print("\n".join(header))
    print()
    print(report(rows, repeats_text))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
