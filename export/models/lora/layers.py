"""What a parsed LoRA is (:class:`LoraLayer`, :class:`LoraWeights`), its errors, and how its layer names
become the base model's module names (:meth:`LoraWeights.resolve`).

Names in the diffusers layout are module names already, up to the suffix (``.lora_A.weight``, the older
``.lora.down.weight`` / ``.lora_linear_layer.down.weight`` / attention-processor ``to_q_lora.down.weight``:
:func:`module_part`, one table for every component). diffusers' ``convert_unet_state_dict_to_peft`` /
``convert_state_dict_to_peft`` do this per component by string replaces, and are not used: the text
encoders' one infers the layout from the whole dict and raises "Could not automatically infer state dict
type" for a PEFT file with only MLP layers, the UNet's leaves ``.lora_linear_layer.`` names as they are.
kohya SD / SDXL names are converted by diffusers' own converters, the two calls that
``StableDiffusionXLLoraLoaderMixin.lora_state_dict`` makes for such a file:
``_maybe_map_sgm_blocks_to_diffusers`` (kohya's SDXL trainer writes the SGM/LDM block names; the block
layout comes from the base's own module names, as diffusers takes it from the UNet config) and
``_convert_non_diffusers_lora_to_diffusers``. They are imported from
``diffusers.loaders.lora_conversion_utils`` when a kohya file is resolved, not with this module: the
service imports this module at start without torch or diffusers, and by the time it builds a variant its
pipeline has imported diffusers (the module then costs milliseconds; ``lora_pipeline``, which holds the
public ``lora_state_dict``, would pull in peft and transformers for seconds more).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Final, Literal, get_args

if TYPE_CHECKING:
    import torch

LoraComponent = Literal["unet", "text_encoder", "text_encoder_2", "transformer"]
COMPONENTS: Final[tuple[str, ...]] = get_args(LoraComponent)
LoraFormat = Literal["diffusers", "kohya"]

# diffusers' file name in a folder written by ``save_lora_weights`` (diffusers' LORA_WEIGHT_NAME_SAFE,
# spelled here so that importing this module imports no diffusers).
DIFFUSERS_WEIGHT_NAME: Final = "pytorch_lora_weights.safetensors"
# The safetensors header key under which diffusers stores the PEFT adapter configs.
METADATA_KEY: Final = "lora_adapter_metadata"
# Where the torch model sits inside the wrapper that export/models/modules.py exports (UNetModule.unet,
# TextEncoderModule.encoder): ONNX initializer name = prefix + the model's parameter name.
ONNX_PREFIXES: Final[dict[str, str]] = {
    "unet": "unet.",
    "text_encoder": "encoder.",
    "text_encoder_2": "encoder.",
    "transformer": "transformer.",  # SD3TransformerModule / FluxTransformerModule.transformer
}
# kohya's key prefix of each component's layers (``lora_te1_`` is a second spelling of ``lora_te_``).
KOHYA_PREFIXES: Final = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


class LoraError(ValueError):
    """A LoRA that cannot be used; the message is meant for the API client."""


class LoraNotFound(LoraError):
    def __init__(self, lora_id: str) -> None:
        self.lora_id = lora_id
        super().__init__(f"LoRa repository '{lora_id}' not found")


class LoraIncompatible(LoraError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"LoRa incompatible with base model: {reason}")


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA layer: ``delta W = scale * up @ down`` (flattened over a conv's kernel)."""

    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    scale: float
    key: str  # the layer's name in the file, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def check(self, weight_shape: tuple[int, ...], where: str) -> None:
        """Raise :class:`LoraIncompatible` unless ``up @ down`` can be shaped like the weight."""
        down, up = self.down, self.up
        out_features = weight_shape[0]
        fan_in = math.prod(weight_shape[1:])
        up_ok = up.ndim in (2, 4) and tuple(up.shape[2:]) in ((), (1, 1))
        down_ok = down.ndim in (2, 4) and (down.ndim == 2 or down.ndim == len(weight_shape))
        if not (
            up_ok
            and down_ok
            and up.shape[1] == down.shape[0]
            and up.shape[0] == out_features
            and math.prod(down.shape[1:]) == fan_in
            and (down.ndim == 2 or tuple(down.shape[1:]) == weight_shape[1:])
        ):
            raise LoraIncompatible(
                f"{where} has weight shape {list(weight_shape)} but LoRA layer '{self.key}' has "
                f"down {list(down.shape)} and up {list(up.shape)}"
            )


@dataclass(frozen=True)
class LoraWeights:
    """A parsed LoRA file: per component, layer name -> :class:`LoraLayer`.

    Layer names are module names for the diffusers layout and for kohya FLUX layers (converted when
    read), and kohya's underscore names (without the ``lora_unet_`` / ``lora_te*_`` prefix) for kohya
    SD / SDXL layers, which :meth:`resolve` converts: their SGM names need the base's block layout.
    """

    source: str
    format: LoraFormat
    layers: Mapping[str, Mapping[str, LoraLayer]]
    sha256: str = ""  # of the file, e.g. for cache keys of variants

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if self.layers.get(c))

    def resolve(self, component: str, module_names: Collection[str]) -> dict[str, LoraLayer]:
        """The layers for ``component`` keyed by the base model's module names.

        Raises :class:`LoraIncompatible` naming the first layer that matches no module.
        """
        layers = self.layers.get(component, {})
        names = frozenset(module_names)
        named = layers.items()
        if self.format == "kohya" and component != "transformer":
            named = _kohya_modules(component, layers, names).items()
        resolved: dict[str, LoraLayer] = {}
        matched: set[int] = set()
        for key, layer in named:
            name = next((n for n in _text_model_variants(component, key) if n in names), None)
            if name is None:
                continue
            if name in resolved:
                raise LoraIncompatible(
                    f"LoRA layers '{resolved[name].key}' and '{layer.key}' both target {component} "
                    f"module '{name}'"
                )
            resolved[name] = layer
            matched.add(id(layer))
        unmatched = [layer.key for layer in layers.values() if id(layer) not in matched]
        if unmatched:
            more = f" (and {len(unmatched) - 1} more of {len(layers)})" if len(unmatched) > 1 else ""
            raise LoraIncompatible(f"{component} has no module for LoRA layer '{unmatched[0]}'{more}")
        return resolved


def _text_model_variants(component: str, name: str) -> Iterable[str]:
    # transformers 5 flattened CLIPTextModel (``encoder.layers...``) but not CLIPTextModelWithProjection
    # (``text_model.encoder.layers...``); files use either (diffusers drops ``text_model.`` likewise).
    yield name
    if component != "unet":
        yield name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"


# (suffix, part, attention-processor layout) in the order they are tried.
_SUFFIXES: Final = (
    (".lora_A.weight", "down", False),
    (".lora_B.weight", "up", False),
    (".lora.down.weight", "down", False),
    (".lora.up.weight", "up", False),
    (".lora_linear_layer.down.weight", "down", False),
    (".lora_linear_layer.up.weight", "up", False),
    ("_lora.down.weight", "down", True),
    ("_lora.up.weight", "up", True),
    (".lora.alpha", "alpha", False),
    (".alpha", "alpha", False),
)
# Attention-processor names (``attn1.processor.to_q_lora``) -> module names.
_PROCESSOR_NAMES: Final = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


def module_part(component: str, name: str) -> tuple[str, str] | None:
    """``(module, part)`` of a diffusers-layout tensor name (without the component prefix), part one of
    ``down``, ``up``, ``alpha``; None for a name that is no plain LoRA tensor."""
    found = next((s for s in _SUFFIXES if name.endswith(s[0])), None)
    if found is None:
        return None
    suffix, part, processor = found
    module = name.removesuffix(suffix)
    if processor:
        head, _, proj = module.rpartition(".")
        table = _PROCESSOR_NAMES["unet" if component == "unet" else "text"]
        if proj not in table:
            raise LoraIncompatible(f"unsupported attention-processor LoRA layer '{module}'")
        module = f"{head.removesuffix('.processor')}.{table[proj]}"
    return module, part


def _kohya_modules(
    component: str, layers: Mapping[str, LoraLayer], names: frozenset[str]
) -> dict[str, LoraLayer]:
    """kohya SD / SDXL layers keyed by diffusers module names, as diffusers' converters name them.

    The converters move values without reading them, so each layer goes in as its own value and comes
    out under its converted name; alphas stay out (each layer has its scale: diffusers would apply
    one alpha to all attention layers of a file whose alphas differ). A layer that diffusers names after
    no module of the base (its heuristics collapse a diffusers-spelled ``add_embedding_linear_1``; it drops
    the SGM names of a file that mixes both layouts; its SGM block matching by substring fails on a UNet
    with 10 or more input blocks, SD 1.5's) is refused, as every layer without a module is: diffusers
    would skip it with a warning.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    prefix = next(p for p, c in KOHYA_PREFIXES.items() if c == component)
    state: dict[str, LoraLayer] = {}
    for name, layer in layers.items():
        state[f"{prefix}{name}.lora_down.weight"] = layer
        state[f"{prefix}{name}.lora_up.weight"] = layer
    try:
        if component == "unet":
            per_block = _layers_per_block(names)
            if per_block is not None:
                state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=per_block))
        converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    except (ValueError, KeyError, IndexError) as e:
        first = next(iter(layers.values())).key
        raise LoraIncompatible(f"cannot convert the {component} layer names (e.g. '{first}'): {e!r}") from e
    modules: dict[str, LoraLayer] = {}
    for key, layer in converted.items():
        found = module_part(component, key.removeprefix(f"{component}."))
        if found is not None and found[1] == "down":
            modules[found[0]] = layer
    return modules


def _layers_per_block(names: Collection[str]) -> int | None:
    """A UNet's ``layers_per_block`` (its config's), read off its module names."""
    indices = [int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))]
    return max(indices) + 1 if indices else None
