"""The precision each exported graph computes in, and the torch wrapper that exports it.

GPU targets export fp16 (or bf16) graphs; the CPU target (python-onnx) exports fp32. The graph's
inputs and outputs stay float32 whatever the precision: the wrapper casts at the edges, so the
specs, the Triton configs and the service are the same for every precision, and TensorRT keeps the
casts (two tiny kernels next to a UNet step).

SDXL's VAE decoder overflows in fp16 (its activations pass 65504); diffusers marks such a VAE with
``force_upcast`` (true by default, false on the "fp16-fix" VAE, ``madebyollin/sdxl-vae-fp16-fix``)
and its SDXL pipeline decodes in fp32 when it is set. The export follows the same flag, for SDXL
only, as diffusers does. The safety checker always stays fp32: it runs once per image, and its
verdict is a threshold that a rounding difference could flip. FLUX's transformer, asked for fp16,
is exported in bf16, the type FLUX.1 is trained and published in: in fp16 it misses the fp16
tolerance in torch itself (its deep stack of blocks rounds far more often than a UNet step).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from export.contract import specs
from export.models.source import ModelSource

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "bf16", "fp32")

TORCH_DTYPES: dict[Precision, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
ONNX_TYPE_NAMES: dict[Precision, str] = {"fp32": "float", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Tolerance:
    """``|graph - torch fp32| <= atol + rtol * max|torch fp32|`` on every output element."""

    atol: float
    rtol: float

    def allowed(self, reference_max_abs: float) -> float:
        return self.atol + self.rtol * reference_max_abs


# fp32 graphs against fp32 torch: only the order of float32 sums differs.
FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
# fp16 keeps 11 significant bits: one rounding is 2**-11 ~ 4.9e-4 relative. A UNet step rounds each
# activation some tens of times (every conv, matmul, norm and residual add of its ~20 blocks) and the
# errors add up roughly like a random walk, so ~1e-3..5e-3 of the output's scale is what a correct fp16
# graph shows (measured on the tiny models: tests/test_tensorrt.py, the fp16 graphs); 1e-2 of the
# largest output value (plus 1e-3 absolute for outputs near zero) leaves room for GPU kernels that
# accumulate in a different order, and still catches a wrong graph (a wrong weight or op is off by O(1)).
FP16_TOLERANCE = Tolerance(atol=1e-3, rtol=1e-2)
# bf16 keeps 8 significant bits (2**-8 ~ 3.9e-3 per rounding): 8x fp16's rounding, same reasoning.
BF16_TOLERANCE = Tolerance(atol=8e-3, rtol=8e-2)
TOLERANCES: dict[Precision, Tolerance] = {
    "fp32": FP32_TOLERANCE,
    "fp16": FP16_TOLERANCE,
    "bf16": BF16_TOLERANCE,
}


def default_precision(target: str) -> Precision:
    """fp16 for the GPU targets, fp32 for the CPU one (python-onnx)."""
    return "fp32" if target == "python-onnx" else "fp16"


def component_precision(source: ModelSource | None, name: str, requested: Precision) -> tuple[Precision, str]:
    """The precision model ``name`` is exported in, and why (for the export log)."""
    if requested == "fp32":
        return "fp32", "fp32 requested"
    if name == specs.SAFETY_CHECKER:
        return "fp32", "the safety checker stays fp32 (a threshold verdict, run once per image)"
    if source is None:
        return requested, f"{requested} requested"
    family = source.family
    if name == family.denoiser and requested == "fp16" and family.denoiser_fp16 != requested:
        return family.denoiser_fp16, (
            "FLUX's transformer is trained and shipped in bf16 and is past the fp16 tolerance in fp16 "
            "(the tiny model in torch alone: 0.069 off against 0.022 allowed); bf16 as its weights are"
        )
    if name == specs.VAE_DECODER and family.vae_force_upcast:
        force_upcast = bool(source.config("vae").get("force_upcast", True))
        if force_upcast:
            return "fp32", (
                "SDXL's VAE decoder overflows in fp16 (vae/config.json force_upcast is true); "
                "kept fp32 as diffusers does. An fp16-fix VAE (force_upcast false) would run in "
                f"{requested}"
            )
        return requested, f"the VAE is marked fp16-safe (vae/config.json force_upcast is false): {requested}"
    return requested, f"{requested} requested"


def with_precision(module: nn.Module, precision: Precision) -> nn.Module:
    """``module`` computing in ``precision``, with float32 inputs and outputs.

    For fp16/bf16 the parameters and buffers are converted in place; hooks cast floating inputs on the
    way in and every output back to float32 on the way out (integer inputs, the token ids, pass
    unchanged). Hooks rather than a wrapper module, so the parameter names, hence the ONNX
    initializer names that LoRA merges and TensorRT refits look up, stay those of the fp32 export.
    """
    if precision == "fp32":
        return module
    dtype = TORCH_DTYPES[precision]
    module.to(dtype)

    def cast_inputs(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(_cast(a, dtype) for a in args)

    def cast_outputs(_: nn.Module, __: tuple[Any, ...], out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return out.float()
        return tuple(o.float() for o in out)

    module.register_forward_pre_hook(cast_inputs)
    module.register_forward_hook(cast_outputs)
    return module


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    return value


@contextlib.contextmanager
def float32_compute(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` (in fp16/bf16) computing in float32 for as long as the context lasts, without a
    float32 copy of the whole model: each submodule's own parameters and buffers are cast up just for
    its forward pass (and its floating inputs with them), then put back.

    The reference a reduced-precision export is checked against when only its weights in that
    precision are in memory: the same weights, float32 arithmetic (what parity with the float32
    module means, less the rounding of the weights themselves, which the graph shares).
    """
    # Per submodule, a stack (re-entrant calls) of the (store, name, original) it cast up.
    saved: dict[int, list[list[tuple[dict[str, Any], str, Any]]]] = {}

    def upcast(sub: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        originals: list[tuple[dict[str, Any], str, Any]] = []
        stores: tuple[dict[str, Any], ...] = (sub._parameters, sub._buffers)
        for store in stores:
            for name, value in store.items():
                if value is not None and value.is_floating_point() and value.dtype != torch.float32:
                    originals.append((store, name, value))
                    if isinstance(value, nn.Parameter):
                        store[name] = nn.Parameter(value.detach().float(), requires_grad=False)
                    else:
                        store[name] = value.float()
        saved.setdefault(id(sub), []).append(originals)
        cast_args = tuple(_cast(a, torch.float32) for a in args)
        return cast_args, {k: _cast(v, torch.float32) for k, v in kwargs.items()}

    def restore(sub: nn.Module, _: Any, __: Any, out: Any) -> Any:
        for store, name, value in saved[id(sub)].pop():
            store[name] = value
        return out

    handles = []
    for sub in module.modules():
        has_own = any(
            v is not None and v.is_floating_point()
            for v in (*sub._parameters.values(), *sub._buffers.values())
        )
        if has_own:
            handles.append(sub.register_forward_pre_hook(upcast, with_kwargs=True))
            handles.append(sub.register_forward_hook(restore, with_kwargs=True))
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
