"""The ``python-torch`` target: Triton python-backend models that run the diffusers modules themselves.

Each Triton model runs the same wrapper module (:mod:`export.models.modules`,
:mod:`export.models.safety`) that the ONNX export traces, so both targets compute one definition of
each model.  Nothing is traced or compiled at export time: the export copies what the module is built
from into the model directory and the model rebuilds it there (:mod:`export.triton_models.torch_source`).

:class:`TorchModel` runs it: fp16 with SDPA attention on CUDA (an SDXL VAE whose config asks for it
stays fp32, as diffusers upcasts it), fp32 on CPU; one forward pass per dynamic batch; the speed
switches of :class:`TorchOptions` (CUDA only), CUDA graphs per shape bucket among them; LoRA variants as
in-place parameter overrides (:mod:`export.triton_models.torch_variants`).
:func:`export.toolchain.torch_check.check_torch_model` runs a freshly written model directory once at
export.

``model_repository/python_torch/model.py`` is the Triton adapter around :class:`TorchModel`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import torch
from torch import nn

from export.contract.specs import VARIANTS_DIR
from export.models.lora import ONNX_PREFIXES
from export.triton_models.torch_source import LoadedComponent, load_component
from export.triton_models.torch_variants import VariantError, VariantWeights

logger = logging.getLogger(__name__)

# Float inputs kept in float32 whatever the module's dtype (diffusers casts the time embedding itself).
FLOAT32_INPUTS: Final = frozenset({"timestep"})

CompileMode = Literal["", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: Final[tuple[str, ...]] = (
    "",
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)
# torch.compile modes that capture CUDA graphs themselves (then our own capture is not wanted).
_COMPILE_MODES_WITH_GRAPHS: Final = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True)
class TorchOptions:
    """How the Triton model runs its module; from the model config's parameters.

    ``channels_last``, ``compile_mode`` (a ``torch.compile`` mode, empty: off) and ``cuda_graphs`` are
    GPU switches: :meth:`for_device` turns them off on CPU.  ``max_lora_variants`` bounds the variants
    kept resident (least recently used evicted first); ``cuda_graph_limit`` the graphs captured.
    """

    channels_last: bool = False
    compile_mode: CompileMode = ""
    cuda_graphs: bool = False
    cuda_graph_limit: int = 32
    max_lora_variants: int = 4
    intra_op_threads: int = 0

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.cuda_graphs and self.compile_mode in _COMPILE_MODES_WITH_GRAPHS:
            raise ValueError(
                f"cuda_graphs and torch.compile mode {self.compile_mode!r} both capture CUDA graphs; "
                "use one of them (or 'max-autotune-no-cudagraphs')"
            )
        if self.max_lora_variants < 1 or self.cuda_graph_limit < 1 or self.intra_op_threads < 0:
            raise ValueError(f"bad torch options: {self}")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> TorchOptions:
        """From Triton config parameters (strings); missing ones keep their defaults."""
        defaults = cls()

        def flag(name: str, default: bool) -> bool:
            value = params.get(name, "").strip().lower()
            if not value:
                return default
            if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(f"parameter {name} must be a boolean, got {value!r}")
            return value in ("true", "1", "yes", "on")

        def number(name: str, default: int) -> int:
            value = params.get(name, "").strip()
            return int(value) if value else default

        return cls(
            channels_last=flag("channels_last", defaults.channels_last),
            compile_mode=params.get("compile_mode", "").strip(),  # type: ignore[arg-type]
            cuda_graphs=flag("cuda_graphs", defaults.cuda_graphs),
            cuda_graph_limit=number("cuda_graph_limit", defaults.cuda_graph_limit),
            max_lora_variants=number("max_lora_variants", defaults.max_lora_variants),
            intra_op_threads=number("intra_op_threads", defaults.intra_op_threads),
        )

    def parameters(self) -> dict[str, str]:
        """The Triton config parameters that give back these options."""
        return {
            "channels_last": str(self.channels_last).lower(),
            "compile_mode": self.compile_mode,
            "cuda_graphs": str(self.cuda_graphs).lower(),
            "cuda_graph_limit": str(self.cuda_graph_limit),
            "max_lora_variants": str(self.max_lora_variants),
            "intra_op_threads": str(self.intra_op_threads),
        }

    def for_device(self, device: torch.device) -> TorchOptions:
        """The options in effect on ``device``: the GPU speed switches are off on CPU."""
        if device.type == "cuda":
            return self
        return replace(self, channels_last=False, compile_mode="", cuda_graphs=False)


def use_sdpa(module: nn.Module) -> None:
    """Switch the transformers models inside ``module`` (CLIP encoders, the checker's vision tower),
    loaded with eager attention for the ONNX export, to PyTorch's scaled-dot-product attention.
    diffusers' UNet and VAE use SDPA by default."""
    for sub in module.modules():
        setter = getattr(sub, "set_attn_implementation", None)
        if callable(setter) and getattr(getattr(sub, "config", None), "_attn_implementation", "") == "eager":
            # A wrapper model without SDPA support of its own (the safety checker) refuses; its CLIP
            # tower, visited next, takes it.
            with contextlib.suppress(ValueError):
                setter("sdpa")


# --------------------------------------------------------------------------------------------------
# CUDA graphs for bucketed shapes
# --------------------------------------------------------------------------------------------------


def batch_bucket(rows: int, max_batch: int) -> int:
    """The batch size a graph is captured at: the next power of two, at most ``max_batch``."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(max(bucket, rows), max(max_batch, rows))


@dataclass
class _Graph:
    graph: Any
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


@dataclass
class CudaGraphs:
    """Replays ``forward`` from CUDA graphs captured per shape bucket (batch padded to a power of two).

    A graph is captured the first time its bucket is seen; beyond ``limit`` graphs, new shapes run
    eagerly.  Padding rows are zeros and their outputs are dropped.  All graphs share one memory pool.
    """

    forward: Callable[..., tuple[torch.Tensor, ...]]
    max_batch: int
    limit: int
    _graphs: dict[tuple, _Graph] = field(default_factory=dict)
    _pool: Any = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = inputs[0].shape[0]
        bucket = batch_bucket(rows, self.max_batch)
        key = (bucket, *((tuple(t.shape[1:]), t.dtype, t.is_contiguous()) for t in inputs))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.limit:
                return self.forward(*inputs)
            entry = self._capture(bucket, inputs)
            self._graphs[key] = entry
        for static, value in zip(entry.inputs, inputs, strict=True):
            static[:rows].copy_(value)
        entry.graph.replay()
        return tuple(out[:rows].clone() for out in entry.outputs)

    def _capture(self, bucket: int, inputs: Sequence[torch.Tensor]) -> _Graph:
        # Static inputs in the callers' memory format (channels_last stays channels_last).
        static = tuple(_pad(t, bucket).clone() for t in inputs)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy init, autotuning)
                self.forward(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.forward(*static)
        logger.info("captured a CUDA graph for batch %d, shapes %s", bucket, [tuple(t.shape) for t in static])
        return _Graph(graph, static, tuple(outputs))


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


class TorchModel:
    """One Triton model's module on one device: batches of requests in, per-request outputs out.

    :meth:`run` concatenates the requests (same variant, same non-batch shapes) along the batch axis,
    runs one forward pass under ``torch.inference_mode`` and splits the outputs back.  Inputs and
    outputs are the spec's, in float32 (the module's dtype only inside).
    """

    def __init__(
        self, loaded: LoadedComponent, device: torch.device, options: TorchOptions, variants_dir: Path
    ) -> None:
        self.spec = loaded.component.spec
        self.device = device
        self.options = options.for_device(device)
        self.dtype = loaded.cuda_dtype if device.type == "cuda" else torch.float32
        if self.options.intra_op_threads:
            torch.set_num_threads(self.options.intra_op_threads)
        module = loaded.module
        use_sdpa(module)
        module.to(device=device, dtype=self.dtype)
        if self.options.channels_last:
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module = module
        prefix = ONNX_PREFIXES.get(self.spec.name)
        self.variants = (
            VariantWeights(
                module.get_submodule(prefix.rstrip(".")), variants_dir, self.options.max_lora_variants
            )
            if prefix is not None
            else None
        )
        forward: Callable[..., Any] = module
        if self.options.compile_mode:
            forward = torch.compile(module, mode=self.options.compile_mode)
        self._forward = (
            CudaGraphs(
                lambda *a: _as_tuple(forward(*a)), self.spec.max_batch_size, self.options.cuda_graph_limit
            )
            if self.options.cuda_graphs
            else lambda *a: _as_tuple(forward(*a))
        )

    @classmethod
    def load(cls, model_dir: Path, version: str, device: torch.device, options: TorchOptions) -> TorchModel:
        """The model of Triton model directory ``model_dir`` (variants under ``model_dir/variants``)."""
        loaded = load_component(model_dir / version, cuda=device.type == "cuda")
        return cls(loaded, device, options, model_dir / VARIANTS_DIR)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs]

    def run(
        self, batch: Sequence[dict[str, torch.Tensor]], variant: str = ""
    ) -> list[dict[str, torch.Tensor]]:
        """One forward pass over ``batch`` (requests whose non-batch shapes agree) with ``variant``."""
        if variant and self.variants is None:
            raise VariantError(f"model {self.spec.name} has no LoRA variants")
        if self.variants is not None:
            self.variants.activate(variant)
        sizes = [len(feeds[self.input_names[0]]) for feeds in batch]
        args = [self._input(name, [feeds[name] for feeds in batch]) for name in self.input_names]
        with torch.inference_mode():
            outputs = self._forward(*args)
        results: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for name, out in zip(self.output_names, outputs, strict=True):
            for result, part in zip(results, out.float().split(sizes), strict=True):
                result[name] = part.contiguous()
        return results

    def _input(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat(parts) if len(parts) > 1 else parts[0]
        joined = joined.to(self.device, non_blocking=True)
        if joined.is_floating_point() and name not in FLOAT32_INPUTS:
            joined = joined.to(self.dtype)
        if self.options.channels_last and joined.dim() == 4:
            joined = joined.contiguous(memory_format=torch.channels_last)
        return joined


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)
