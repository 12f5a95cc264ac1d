"""The ``python-torch`` target: Triton python-backend models that run the diffusers modules themselves.

Each Triton model runs the same wrapper module (:mod:`export.models.modules`,
:mod:`export.models.safety`) that the ONNX export traces, so both targets compute one definition of
each model.  Nothing is traced or compiled at export time:

1. :func:`write_torch_model` copies what the module is built from into ``<model>/1/source/``: the
   component's diffusers subfolders (config + safetensors weights), the small JSON configs of the
   other subfolders (the loaders read the model's description from them), and ``torch_module.json``
   naming the component and its CUDA dtype.
2. :func:`load_component` rebuilds the component from that folder with the very loader the exporter
   uses (:func:`export.models.modules.components` over the copied folder, or the safety checker's).
3. :class:`TorchModel` runs it: fp16 with SDPA attention on CUDA (an SDXL VAE whose config asks for
   it stays fp32, as diffusers upcasts it), fp32 on CPU; one forward pass per dynamic batch; the speed
   switches of :class:`TorchOptions` (CUDA only); LoRA variants as in-place parameter overrides
   (:class:`VariantWeights`).

``model_repository/python_torch/model.py`` is the Triton adapter around :class:`TorchModel`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import torch
from torch import nn

from export.contract.specs import SAFETY_CHECKER, VAE_DECODER, VARIANT_KEY, VARIANTS_DIR, ModelSpec
from export.models.lora import ONNX_PREFIXES
from export.models.modules import Component, components
from export.models.safety import SafetyCheckerSource
from export.models.source import ModelSource, read_json_object
from export.models.weights import WeightChoice

logger = logging.getLogger(__name__)

MODULE_FILE: Final = "torch_module.json"
SOURCE_DIR: Final = "source"
# ``<model dir>/variants/<key>.safetensors``: a LoRA variant's merged parameters (the LoRA contract).
# Request parameter naming the LoRA variant (absent or empty: the base model).
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
_DTYPES: Final[dict[str, torch.dtype]] = {"float16": torch.float16, "float32": torch.float32}


class TorchModelError(RuntimeError):
    """A python-torch model directory whose module cannot be rebuilt or does not fit its spec."""


class VariantError(ValueError):
    """A request names a LoRA variant this model cannot serve: bad key, no file, or a file that does
    not fit the module."""


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


# --------------------------------------------------------------------------------------------------
# Export: the model directory
# --------------------------------------------------------------------------------------------------


def write_torch_model(
    component: Component, version_dir: Path, weights: WeightChoice, *, cuda_dtype: str
) -> None:
    """Copy what ``component`` is built from (its chosen weight files and configs) into
    ``version_dir/source``.

    The component's subfolders are relative to its root: the diffusers model folder, or a safety
    checker's root.  For a pipeline component the JSON configs of every subfolder come too, since the
    loaders read the model's description (UNet sample size, VAE scale...) from them.  Weight files are
    hard-linked where the file system allows, else copied.
    """
    if cuda_dtype not in _DTYPES:
        raise ValueError(f"cuda_dtype must be one of {sorted(_DTYPES)}, got {cuda_dtype!r}")
    root = component.root
    source = version_dir / SOURCE_DIR
    source.mkdir(parents=True)
    info: dict[str, Any] = {"name": component.spec.name, "cuda_dtype": cuda_dtype}
    files = component.source_files(weights)
    if component.spec.name == SAFETY_CHECKER:
        info["loader"] = "safety_checker"
        info["checker"] = component.subfolders[0]
    else:
        info["loader"] = "pipeline"
        files += [p.relative_to(root).as_posix() for p in (*root.glob("*.json"), *root.glob("*/*.json"))]
    for rel in sorted(set(files)):
        target = source / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(str(root / rel), str(target))
    (version_dir / MODULE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def cuda_dtype_for(source: ModelSource, spec: ModelSpec) -> str:
    """fp16, except an SDXL VAE whose config says ``force_upcast`` (its fp16 decode overflows), which
    diffusers' SDXL pipeline runs in fp32."""
    if (
        spec.name == VAE_DECODER
        and source.family.vae_force_upcast
        and source.config("vae").get("force_upcast", True)
    ):
        return "float32"
    return "float16"


@dataclass(frozen=True)
class LoadedComponent:
    component: Component
    module: nn.Module
    cuda_dtype: torch.dtype


def load_component(version_dir: Path, cuda: bool = False) -> LoadedComponent:
    """Rebuild the component written by :func:`write_torch_model`, on CPU in eval mode: in float32, or
    with ``cuda`` in the dtype it runs in on a GPU (loaded so, not cast after a float32 load)."""
    info = read_json_object(version_dir / MODULE_FILE)
    cuda_dtype = _DTYPES[str(info.get("cuda_dtype", "float16"))]
    source = version_dir / SOURCE_DIR
    if info.get("loader") == "safety_checker":
        component = SafetyCheckerSource.find(source / str(info["checker"])).component()
    else:
        matches = [c for c in components(ModelSource(source)) if c.spec.name == info.get("name")]
        if not matches:
            raise TorchModelError(
                f"{version_dir}: the model in {source} has no component {info.get('name')!r}"
            )
        component = matches[0]
    module = component.load(cuda_dtype if cuda else torch.float32).eval().requires_grad_(False)
    return LoadedComponent(component, module, cuda_dtype)


def base_state(model_dir: Path, version: str = "1") -> dict[str, torch.Tensor]:
    """The base weights a LoRA variant of Triton model directory ``model_dir`` merges into, keyed as
    the variant file must key them (the diffusers module's parameter names, as
    :func:`export.models.lora.load_base_state` gives them): the state for
    :func:`export.models.lora.merge_deltas` on this target, where there is no ONNX graph to read it from."""
    loaded = load_component(model_dir / version)
    prefix = ONNX_PREFIXES.get(loaded.component.spec.name)
    if prefix is None:
        raise TorchModelError(f"{model_dir}: model {loaded.component.spec.name} takes no LoRA variants")
    return {
        k.removeprefix(prefix): v.detach()
        for k, v in loaded.module.state_dict().items()
        if k.startswith(prefix)
    }


def check_torch_model(version_dir: Path) -> None:
    """Rebuild the module from ``version_dir`` alone and run it (CPU, float32) at the spec's check
    sizes: the folder is complete and the outputs have the spec's names, count and known axes.
    Raises :class:`TorchModelError` naming what does not fit."""
    from export.toolchain.onnx_export import example_inputs

    model = TorchModel(load_component(version_dir), torch.device("cpu"), TorchOptions(), version_dir)
    spec = model.spec
    for i, sizes in enumerate(spec.check_sizes):
        feeds = {k: torch.from_numpy(v) for k, v in example_inputs(spec, sizes, seed=i + 1).items()}
        (outputs,) = model.run([feeds])
        for t in spec.outputs:
            got = tuple(outputs[t.name].shape)
            expected = tuple(sizes.get(a) if isinstance(a, str) else a for a in t.shape)
            if len(got) != len(expected) or any(
                e is not None and e != g for e, g in zip(expected, got, strict=True)
            ):
                raise TorchModelError(
                    f"{spec.name}.{t.name} at {sizes}: shape {got}, the spec says {t.shape}"
                )
            if not bool(torch.isfinite(outputs[t.name]).all()):
                raise TorchModelError(f"{spec.name}.{t.name} at {sizes}: non-finite values")
    logger.info("%s: torch module rebuilt from %s runs at %s", spec.name, version_dir, spec.check_sizes)


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
# LoRA variants: in-place parameter overrides
# --------------------------------------------------------------------------------------------------


class VariantWeights:
    """LoRA variants of ``module`` (the diffusers model inside the wrapper) as in-place overrides.

    Variant ``key``'s merged parameters are read from ``directory/<key>.safetensors`` and kept on the
    module's device; at most ``max_resident`` stay resident, least recently used dropped first.
    :meth:`activate` copies a variant's tensors into the parameters (and the base values back when
    switching away), so the parameters keep their storage: compiled modules and captured CUDA graphs
    see the variant's weights without being rebuilt.  The base values of the parameters that resident
    variants touch are kept beside them.
    """

    def __init__(self, module: nn.Module, directory: Path, max_resident: int) -> None:
        self.directory = directory
        self.max_resident = max_resident
        self._params = dict(module.named_parameters())
        self._resident: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._base: dict[str, torch.Tensor] = {}
        self.active = ""

    @property
    def resident(self) -> list[str]:
        """Keys of the resident variants, least recently used first."""
        return list(self._resident)

    @torch.no_grad()
    def activate(self, key: str) -> None:
        """Make the module compute variant ``key`` ("" = base).  Raises :class:`VariantError`."""
        if key == self.active:
            if key:
                self._resident.move_to_end(key)
            return
        overrides = self._load(key) if key else {}
        self._restore_base()
        for name, tensor in overrides.items():
            self._params[name].copy_(tensor)
        self.active = key

    def _restore_base(self) -> None:
        if self.active:
            for name in self._resident[self.active]:
                self._params[name].copy_(self._base[name])
        self.active = ""

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        if not VARIANT_KEY.fullmatch(key):
            raise VariantError(f"bad LoRA variant key {key[:80]!r}: expected 16 to 64 lowercase hex digits")
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            raise VariantError(f"LoRA variant {key} not found: {path} is missing")
        overrides = self._read(path)
        while len(self._resident) >= self.max_resident:
            self._evict(next(iter(self._resident)))
        for name in overrides:
            if name not in self._base:
                self._base[name] = self._params[name].detach().clone()
        self._resident[key] = overrides
        logger.info("LoRA variant %s resident (%d tensors)", key, len(overrides))
        return overrides

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise VariantError(f"cannot read LoRA variant {path.name}: {e}") from e
        overrides = {}
        for name, tensor in tensors.items():
            param = self._params.get(name)
            if param is None:
                raise VariantError(f"LoRA variant {path.name}: the model has no parameter '{name}'")
            if tuple(tensor.shape) != tuple(param.shape):
                raise VariantError(
                    f"LoRA variant {path.name}: '{name}' has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            overrides[name] = tensor.to(device=param.device, dtype=param.dtype)
        return overrides

    def _evict(self, key: str) -> None:
        if key == self.active:
            self._restore_base()
        del self._resident[key]
        still_used = {name for tensors in self._resident.values() for name in tensors}
        for name in [n for n in self._base if n not in still_used]:
            del self._base[name]
        logger.info("LoRA variant %s dropped (least recently used)", key)


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
