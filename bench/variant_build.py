"""LoRA variant build time: the service's merge-and-write against diffusers' load + fuse.

For each model size (``tiny``: :func:`export.tiny.build_tiny_model`; ``mid``: an SD 1.5 architecture
at reduced width, random weights under fixed seeds) and each LoRA layout (diffusers/PEFT and kohya,
from :func:`export.tiny_lora.build_tiny_lora`), this times:

- **variant build**: ``VariantManager._build(key, sources)``, what the service runs on the first
  request for a LoRA set and reports as ``t2i_lora_variant_build_seconds``: read the LoRA, read the
  base UNet / text-encoder ONNX graphs, merge, write the variant model folders. A fresh key per
  repeat, so nothing is reused; the variant folders are deleted after each repeat. The time is also
  split into phases by wrapping the functions ``_build`` calls (negligible overhead).
- **diffusers load + fuse**: the baseline a user would pick instead: ``pipe.load_lora_weights(path)``
  + ``pipe.fuse_lora()`` on an already loaded ``StableDiffusionPipeline`` (then, untimed in that
  figure, ``unfuse_lora`` + ``unload_lora_weights``, timed separately).
- **Triton load** (unless ``--no-triton``): loading the variant's models into the bundled Triton
  (explicit model control, base ``unet`` and ``text_encoder`` loaded) over gRPC ``load_model``, as
  the service does after a build: a python-backend stub per model, which opens an onnxruntime
  session on the merged graph. Timed after the builds, with variants built again for it, so that
  Triton's loads and unloads (which use every core) never overlap the other measurements.

Models, repositories (exported with ``RepositoryOptions(check=False)``: no ONNX-vs-torch check) and
LoRA files are cached in ``--work``, so a rerun only measures. One untimed warm-up run of each
measurement precedes the repeats. Absolute figures hold only for the machine they ran on.

``python -m bench.variant_build --sizes tiny,mid --repeats 3``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from bench import machine

logger = logging.getLogger("bench.variant_build")

Size = Literal["tiny", "mid"]
SIZES: Final[tuple[Size, ...]] = ("tiny", "mid")
Format = Literal["diffusers", "kohya"]
FORMATS: Final[tuple[Format, ...]] = ("diffusers", "kohya")
DEFAULT_WORK: Final = Path(tempfile.gettempdir()) / "t2i-bench-variant-build"
LORA_SEED: Final = 7
TEXT_ENCODERS: Final = ("text_encoder",)
VARIANT_PREFIX: Final = "bench"

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

    from export.tiny import MARKER_FILE, build_tiny_model

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
    from export.tiny_lora import build_tiny_lora

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
    from export.repository import RepositoryOptions, export_repository
    from export.tiny import build_tiny_model

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
    """Variant folders an interrupted run left behind (they would otherwise pile up on disk)."""
    for path in repository.iterdir():
        if f"__{VARIANT_PREFIX}" in path.name:
            shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Measurements


class Phases:
    """Time spent in the functions ``VariantManager._build`` calls, by wrapping them while active."""

    # (module, attribute, phase): server.variants' own references, export.lora's for _save.
    TARGETS: Final = (
        ("server.variants", "load_lora", "read LoRA"),
        ("server.variants", "onnx_state", "ONNX load -> torch"),
        ("server.variants", "merge_deltas", "merge"),
        ("server.variants", "write_merged_onnx", "write"),
        ("export.lora", "_save", "ONNX save"),
    )

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.merged_params = 0

    def _wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
            if phase == "merge":
                self.merged_params += len(result)
            return result

        return timed

    @contextlib.contextmanager
    def active(self) -> Iterator[Phases]:
        originals: list[tuple[Any, str, Any]] = []
        try:
            for module_name, attr, phase in self.TARGETS:
                module = sys.modules[module_name]
                original = getattr(module, attr)
                originals.append((module, attr, original))
                setattr(module, attr, self._wrap(phase, original))
            yield self
        finally:
            for module, attr, original in reversed(originals):
                setattr(module, attr, original)

    def split(self, total: float) -> dict[str, float]:
        """Disjoint phases: ``write`` less its save is the second ONNX load and the initializer swap."""
        s = self.seconds
        parts = {
            "read LoRA": s["read LoRA"],
            "ONNX load -> torch": s["ONNX load -> torch"],
            "merge": s["merge"],
            "ONNX reload + replace": s["write"] - s["ONNX save"],
            "ONNX save": s["ONNX save"],
        }
        parts["other (copy, config, rename)"] = total - sum(parts.values())
        return parts


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
    build: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    fuse: list[float] = field(default_factory=list)
    unfuse_unload: list[float] = field(default_factory=list)
    triton_load: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    @property
    def load_fuse(self) -> list[float]:
        return [a + b for a, b in zip(self.load, self.fuse, strict=True)]


def _no_client() -> Any:
    raise RuntimeError("the benchmark times VariantManager._build only; it needs no Triton client")


class VariantBuilder:
    """The service's variant build on one repository, as ``VariantManager`` runs it."""

    def __init__(self, prepared: Prepared) -> None:
        from server.metrics import Metrics
        from server.settings import Settings
        from server.variants import VariantManager

        settings = Settings(model_id=str(prepared.model_dir), model_repository=prepared.repository)
        self.manager = VariantManager(settings, prepared.repository, TEXT_ENCODERS, _no_client, Metrics())

    def build(self, lora_id: str, path: Path, phases: Phases | None = None) -> tuple[float, list[str]]:
        """Seconds for one ``_build`` with a fresh key, and the model folders it wrote."""
        from server.variants import _Source

        key = f"{VARIANT_PREFIX}{uuid.uuid4().hex[:12]}"
        sources = [_Source(lora_id, path, 1.0)]
        with phases.active() if phases is not None else contextlib.nullcontext():
            started = time.perf_counter()
            models = self.manager._build(key, sources)
            seconds = time.perf_counter() - started
        return seconds, [n for n in models.names if n not in self.manager.base.names]

    def remove(self, names: list[str]) -> None:
        for name in names:
            shutil.rmtree(self.manager.repository / name, ignore_errors=True)


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


class TritonLoader:
    """The bundled Triton on the repository (explicit model control, base models loaded)."""

    def __init__(self, prepared: Prepared, work: Path) -> None:
        from server.triton.launcher import BundledTriton, TritonLaunchConfig

        config = TritonLaunchConfig(
            model_repository=prepared.repository,
            state_dir=work / f"state-{prepared.size}",
            explicit_model_control=True,
            load_models=("unet", *TEXT_ENCODERS),
            startup_timeout_s=600.0,
        )
        self.server = BundledTriton(config)

    def __enter__(self) -> TritonLoader:
        import tritonclient.grpc as grpcclient

        started = time.perf_counter()
        self.server.start()
        logger.info("Triton up with the base models in %.1f s", time.perf_counter() - started)
        self.client = grpcclient.InferenceServerClient(url=self.server.grpc_url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.stop()

    def load(self, names: list[str]) -> float:
        """Seconds to load ``names`` (one after the other, as the service does); then unloads them."""
        started = time.perf_counter()
        for name in names:
            self.client.load_model(name, client_timeout=600)
        seconds = time.perf_counter() - started
        for name in names:
            self.client.unload_model(name)
        # Unloading is asynchronous: wait until the models are gone before the next measurement.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(self.client.is_model_ready(n) for n in names):
            time.sleep(0.1)
        return seconds


def measure(prepared: Prepared, repeats: int, work: Path, triton: bool) -> list[Row]:
    """Variant builds interleaved with diffusers' load + fuse, then (Triton up) the variants' loads.

    Triton runs only in the second part, so its model loads (which use every core) never overlap
    the timed builds or the diffusers calls.
    """
    from export.lora import load_lora

    builder = VariantBuilder(prepared)
    baseline = DiffusersBaseline(prepared.model_dir)
    unet_params, te_params = baseline.params()
    onnx_bytes = sum(
        (prepared.repository / n / "1" / "model.onnx").stat().st_size for n in ("unet", "text_encoder")
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
        )
        lora_id = f"bench/{prepared.size}-{fmt}"
        # Warm-up (untimed): first-call imports and allocations, page cache.
        _, names = builder.build(lora_id, path)
        builder.remove(names)
        baseline.run(path)
        for i in range(repeats):
            phases = Phases()
            seconds, names = builder.build(lora_id, path, phases)
            builder.remove(names)
            row.build.append(seconds)
            row.merged_params = phases.merged_params
            for phase, value in phases.split(seconds).items():
                row.phases.setdefault(phase, []).append(value)
            gc.collect()
            load, fuse, unfuse = baseline.run(path)
            row.load.append(load)
            row.fuse.append(fuse)
            row.unfuse_unload.append(unfuse)
            gc.collect()
            logger.info(
                "%s %s repeat %d/%d: variant build %.3f s, diffusers load %.3f + fuse %.3f s",
                prepared.size,
                fmt,
                i + 1,
                repeats,
                seconds,
                load,
                fuse,
            )
        rows.append(row)
    del baseline
    gc.collect()
    if triton:
        with TritonLoader(prepared, work) as loader:
            for row in rows:
                path = prepared.loras[cast(Format, row.fmt)]
                for i in range(repeats + 1):  # the first one is a warm-up
                    _, names = builder.build(f"bench/{prepared.size}-{row.fmt}", path)
                    seconds = loader.load(names)
                    builder.remove(names)
                    if i:
                        row.triton_load.append(seconds)
                        logger.info("%s %s: Triton load of %s in %.2f s", row.size, row.fmt, names, seconds)
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
        f"Seconds, median (min) over {repeats} repeats after 1 warm-up; ratio = median variant build / "
        "median diffusers load+fuse; ratio w/ Triton = (median build + median Triton load) / median "
        "diffusers load+fuse: the service's extra latency on a LoRA set's first request against diffusers'.",
        "",
        "| size | LoRA | UNet / TE params | LoRA layers unet/te (MB) | merged params | variant build s "
        "| diffusers load+fuse s | ratio | load / fuse / unfuse+unload s | Triton load s | ratio w/ Triton "
        "| base ONNX unet+te MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layers = "/".join(str(r.lora_layers.get(c, 0)) for c in ("unet", "text_encoder"))
        ratio = statistics.median(r.build) / statistics.median(r.load_fuse)
        split = " / ".join(_s(statistics.median(v)) for v in (r.load, r.fuse, r.unfuse_unload))
        with_triton = "-"
        if r.triton_load:
            total = statistics.median(r.build) + statistics.median(r.triton_load)
            with_triton = f"{total / statistics.median(r.load_fuse):.1f}x"
        lines.append(
            f"| {r.size} | {r.fmt} | {_params(r.unet_params)} / {_params(r.text_encoder_params)} "
            f"| {layers} ({_mb(r.lora_bytes)}) | {r.merged_params} | {_med_min(r.build)} "
            f"| {_med_min(r.load_fuse)} | {ratio:.1f}x | {split} | {_med_min(r.triton_load)} "
            f"| {with_triton} | {_mb(r.onnx_bytes)} |"
        )
    phases = list(rows[0].phases) if rows else []
    lines += [
        "",
        "Where the variant build goes (median seconds per phase, share of the median build):",
        "",
        "| size | LoRA | " + " | ".join(phases) + " |",
        "|---|---|" + "---|" * len(phases),
    ]
    for r in rows:
        total = statistics.median(r.build)
        cells = [
            f"{_s(statistics.median(r.phases[p]))} ({100 * statistics.median(r.phases[p]) / total:.0f}%)"
            for p in phases
        ]
        lines.append(f"| {r.size} | {r.fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.variant_build",
        description="Time LoRA variant builds (merge + write of ONNX graphs) against diffusers' load+fuse.",
    )
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated, of: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size and LoRA layout")
    parser.add_argument(
        "--mid-repeats", type=int, default=None, help="repeats for the mid model (default: --repeats)"
    )
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="cache of models, repositories, LoRAs"
    )
    parser.add_argument("--no-triton", action="store_true", help="skip timing the variant's load into Triton")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.setLevel(logging.INFO)
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
        rows += measure(prepared, repeats, args.work, triton=not args.no_triton)
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
