"""The LoRA variant benchmark's rows (:mod:`bench.variant_build`) and their Markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    """One model size and LoRA layout: its sizes, and its timings in seconds (lists: one per repeat)."""

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
