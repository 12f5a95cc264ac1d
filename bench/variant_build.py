"""LoRA variant cost: the service's build and first request against diffusers' load + fuse, same run.

For each model size (``tiny``: :func:`export.fixtures.tiny.build_tiny_model`; ``mid``: an SD 1.5 architecture
at reduced width, random weights under fixed seeds) and each LoRA layout (diffusers/PEFT and kohya,
from :func:`export.fixtures.tiny_lora.build_tiny_lora`), interleaved per repeat:

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from bench import log_to_stderr, machine

logger = logging.getLogger("bench.variant_build")

Size = Literal["tiny", "mid"]
SIZES: Final[tuple[Size, ...]] = ("tiny", "mid")
Format = Literal["diffusers", "kohya"]
FORMATS: Final[tuple[Format, ...]] = ("diffusers", "kohya")
DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-variant-build"
LORA_SEED: Final = 7
TEXT_ENCODERS: Final = ("text_encoder",)

# The mid model: SD 1.5's UNet (block types, 2 layers per block, 8 heads, 768-wide cross attention)
# at half its width, and SD 1.5's text encoder (CLIP ViT-L/14 text tower) at full size.
MID_VERSION: Final = "1"
MID_MARKER: Final = "bench_model.json"
MID_SEEDS: Final = {"unet": 0, "text_encoder": 2}
MID_UNET: Final[dict[str, Any]] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (160, 320, 640, 640),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
MID_TEXT: Final[dict[str, Any]] = {
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
}


# --------------------------------------------------------------------------------------------
# Models, repositories and LoRA files (cached in --work)


@dataclass(frozen=True)
class Prepared:
    size: Size
    model_dir: Path
    repository: Path
    loras: dict[Format, Path]


def build_mid_model(work: Path) -> Path:
    """The mid model folder: the tiny SD model with its UNet and text encoder replaced."""
    out = work / "models" / "mid-sd"
    marker = {"version": MID_VERSION, "unet": MID_UNET, "text_encoder": MID_TEXT, "seeds": MID_SEEDS}
    try:
        if json.loads((out / MID_MARKER).read_text()) == json.loads(json.dumps(marker)):
            logger.info("mid model already built at %s", out)
            return out
    except (OSError, ValueError):
        pass
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from export.fixtures.tiny import MARKER_FILE, build_tiny_model

    started = time.perf_counter()
    tiny = build_tiny_model("sd", work / "models" / "tiny-sd")
    staging = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tiny, staging)
    (staging / MARKER_FILE).unlink()
    for sub in ("unet", "text_encoder"):
        shutil.rmtree(staging / sub)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MID_SEEDS["unet"])
        unet = cast(Any, UNet2DConditionModel)(**MID_UNET)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        del unet
        torch.manual_seed(MID_SEEDS["text_encoder"])
        encoder = CLIPTextModel(CLIPTextConfig(**MID_TEXT))
        encoder.save_pretrained(staging / "text_encoder")
        del encoder
    # model_index.json already names UNet2DConditionModel / CLIPTextModel: nothing to change there.
    (staging / MID_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    logger.info("built mid model at %s in %.1f s", out, time.perf_counter() - started)
    return out


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
    from export.toolchain.repository import RepositoryOptions, export_repository

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


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Row:
    size: str
    fmt: str
    unet_params: int
    text_encoder_params: int
    onnx_bytes: int  # base unet + text_encoder model.onnx
    lora_bytes: int
    lora_layers: dict[str, int]
    merged_params: int = 0
    changed_bytes: int = 0  # bytes of the tensors the variant changes
    file_bytes: int = 0  # bytes of its override files
    index_s: float = 0.0  # the base index, once per service
    overridable_s: float = 0.0  # the overridable sessions, once per model
    step_base: float = 0.0  # one UNet call, base session
    step_variant: float = 0.0  # the same call on the overridable session with overrides
    build: list[float] = field(default_factory=list)
    plan: list[float] = field(default_factory=list)
    write: list[float] = field(default_factory=list)
    session: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    fuse: list[float] = field(default_factory=list)
    service_first: float = 0.0  # this layout's first LoRA request of the service (HTTP)
    first_request: list[float] = field(default_factory=list)
    loaded_request: list[float] = field(default_factory=list)
    http_load_fuse: list[float] = field(default_factory=list)

    @property
    def load_fuse(self) -> list[float]:
        return [a + b for a, b in zip(self.load, self.fuse, strict=True)]

    @property
    def extra(self) -> list[float]:
        return [a - b for a, b in zip(self.first_request, self.loaded_request, strict=True)]


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


# --------------------------------------------------------------------------------------------
# Report


def _s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.2f}"


def _med_min(values: list[float]) -> str:
    return f"{_s(statistics.median(values))} ({_s(min(values))})" if values else "-"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}" if n >= 2**20 else f"{n / 2**20:.2f}"


def report(rows: list[Row], repeats: str) -> str:
    lines = [
        f"Seconds, median (min) over {repeats} repeats after 1 warm-up. build = merge + write of the "
        "override files; read overrides = what the model does on a new variant's first batch (its "
        "overridable sessions, opened once per model, are a separate column); first-request extra = "
        "(first request with a new LoRA set) - (the same request again), through HTTP; ratios against "
        "diffusers' load+fuse timed in the same loop.",
        "",
        "| size | LoRA | UNet / TE params | LoRA layers unet/te (MB) | merged params | base index s (once) "
        "| overridable sessions s (once) | build s | read overrides s | diffusers load+fuse s "
        "| (build+read) / diffusers "
        "| first-request extra s | diffusers load+fuse s (HTTP loop) | extra / diffusers "
        "| changed MB | file MB | file / changed | base ONNX unet+te MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layers = "/".join(str(r.lora_layers.get(c, 0)) for c in ("unet", "text_encoder"))
        ratio = (statistics.median(r.build) + statistics.median(r.session)) / statistics.median(r.load_fuse)
        extra = http_ratio = "-"
        if r.first_request:
            extra = _med_min(r.extra)
            http_ratio = f"{statistics.median(r.extra) / statistics.median(r.http_load_fuse):.2f}x"
        lines.append(
            f"| {r.size} | {r.fmt} | {_params(r.unet_params)} / {_params(r.text_encoder_params)} "
            f"| {layers} ({_mb(r.lora_bytes)}) | {r.merged_params} | {_s(r.index_s)} | {_s(r.overridable_s)} "
            f"| {_med_min(r.build)} "
            f"| {_med_min(r.session)} | {_med_min(r.load_fuse)} | {ratio:.2f}x | {extra} "
            f"| {_med_min(r.http_load_fuse)} | {http_ratio} | {_mb(r.changed_bytes)} | {_mb(r.file_bytes)} "
            f"| {r.file_bytes / max(1, r.changed_bytes):.3f} | {_mb(r.onnx_bytes)} |"
        )
    lines += [
        "",
        "One UNet call (batch 2, 64x64 latents), median of 3: the base session against the overridable "
        "session fed a variant's overrides (what a variant's step costs).",
        "",
        "| size | LoRA | base s | variant s | variant / base |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.step_variant / r.step_base if r.step_base else 0.0
        lines.append(f"| {r.size} | {r.fmt} | {_s(r.step_base)} | {_s(r.step_variant)} | {ratio:.2f}x |")
    http = [r for r in rows if r.first_request]
    if http:
        lines += [
            "",
            "The first request of each LoRA layout through HTTP, before the timed repeats, seconds: the "
            "service's first LoRA request (diffusers layout) also opens the python-onnx models' "
            "overridable sessions, once per model.",
            "",
            "| size | LoRA | first request of this layout s | same set again, median s |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.size} | {r.fmt} | {_s(r.service_first)} | {_s(statistics.median(r.loaded_request))} |"
            for r in http
        ]
    return "\n".join(lines)


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
