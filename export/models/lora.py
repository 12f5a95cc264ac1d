"""LoRA files -> low-rank factors per module -> merged weights -> ONNX graphs with merged initializers.

A LoRA variant of a model (docs/ARCHITECTURE.md section 5) is the base model with
``W' = W + sum_i weight_i * scale_i * (B_i @ A_i)`` merged into the weights its LoRAs touch, the
same weights diffusers computes with ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``.

1. :func:`load_lora` reads a ``.safetensors`` file (or a folder holding one) in either layout:

   - diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (older files:
     ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight``, attention-processor
     ``.processor.to_q_lora.down.weight``; prefixes ``unet.``, ``text_encoder.``,
     ``text_encoder_2.``; no prefix means the UNet). The scale is PEFT's ``lora_alpha / r``
     (``rank_pattern`` / ``alpha_pattern`` / ``use_rslora`` honoured) from the adapter metadata that
     diffusers' ``save_lora_weights`` writes into the safetensors header
     (``lora_adapter_metadata``: JSON with ``unet.r``, ``unet.lora_alpha``, ...); else from
     ``<module>.alpha`` tensors (``alpha / rank``); else 1, diffusers' convention for files
     without alphas.
   - kohya-ss / A1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
     / ``.alpha`` (scale ``alpha / rank``; no alpha means scale 1), ``lora_te_`` / ``lora_te1_`` for
     the first text encoder and ``lora_te2_`` for the second.

2. :func:`plan_merge` resolves the LoRA's layer names against the base model's parameter names
   (kohya names through a lookup built from the base's own module names, SDXL's SGM/LDM block
   names through the block layout read off those names) and checks every shape;
   :func:`merged_weight` adds a parameter's LoRA terms to its base weight in float32, and
   :func:`merge_deltas` does both for a whole state dict, returning only the changed parameters.

3. :func:`write_merged_onnx` puts those parameters into a copy of the exported ONNX graph
   (:func:`initializer_map` names the initializers; :func:`onnx_state` reads the base state out of
   the graph itself, :func:`load_base_state` out of the diffusers folder). This needs initializers
   named after the torch parameters, which :func:`export.toolchain.onnx_export.export_onnx` keeps (no
   constant folding, no deduplication).

Every problem with a LoRA raises a :class:`LoraError`: :class:`LoraNotFound` or
:class:`LoraIncompatible`, whose messages are the ones operators grep for (docs/ARCHITECTURE.md section 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "COMPONENTS",
    "ONNX_PREFIXES",
    "LoraComponent",
    "LoraError",
    "LoraFormat",
    "LoraIncompatible",
    "LoraLayer",
    "LoraNotFound",
    "LoraWeights",
    "OnnxGraph",
    "OnnxWeightsError",
    "check_components",
    "initializer_map",
    "load_base_state",
    "load_graph",
    "load_lora",
    "merge_deltas",
    "merged_weight",
    "onnx_state",
    "plan_merge",
    "write_merged_onnx",
]

logger = logging.getLogger(__name__)

LoraComponent = Literal["unet", "text_encoder", "text_encoder_2", "transformer"]
COMPONENTS: Final[tuple[str, ...]] = get_args(LoraComponent)
LoraFormat = Literal["diffusers", "kohya"]

# diffusers' file name in a folder written by ``save_lora_weights``.
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


class OnnxWeightsError(RuntimeError):
    """The ONNX graph cannot take merged weights (not the LoRA's fault: an export problem)."""


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

    Layer names are module names for the diffusers layout and kohya's underscore names (without
    the ``lora_unet_`` / ``lora_te*_`` prefix) for kohya; :meth:`resolve` maps them to the base
    model's module names.
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
        resolver = _Resolver(component, frozenset(module_names))
        resolved: dict[str, LoraLayer] = {}
        unmatched: list[str] = []
        for key, layer in layers.items():
            name = resolver.diffusers(key) if self.format == "diffusers" else resolver.kohya(key)
            if name is None:
                unmatched.append(layer.key)
            elif name in resolved:
                raise LoraIncompatible(
                    f"LoRA layers '{resolved[name].key}' and '{layer.key}' both target {component} "
                    f"module '{name}'"
                )
            else:
                resolved[name] = layer
        if unmatched:
            more = f" (and {len(unmatched) - 1} more of {len(layers)})" if len(unmatched) > 1 else ""
            raise LoraIncompatible(f"{component} has no module for LoRA layer '{unmatched[0]}'{more}")
        return resolved


# --------------------------------------------------------------------------------------------
# 1. Loading


def load_lora(path: Path, lora_id: str | None = None) -> LoraWeights:
    """Read a LoRA from a ``.safetensors`` file or a folder holding one.

    A folder must hold ``pytorch_lora_weights.safetensors`` (diffusers' name) or exactly one
    ``.safetensors`` file. ``lora_id`` (default: the path) is the name used in error messages,
    e.g. the repository id the client asked for.
    """
    path = Path(path)
    lora_id = lora_id if lora_id is not None else str(path)
    file = _lora_file(path, lora_id)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraIncompatible(f"cannot read '{lora_id}' as a safetensors file: {e}") from e
    if not tensors:
        raise LoraIncompatible(f"'{lora_id}' holds no tensors")
    digest = _sha256(file)
    kohya_keys = [k for k in tensors if k.startswith(_KOHYA_PREFIXES)]
    if kohya_keys and len(kohya_keys) != len(tensors):
        other = next(k for k in tensors if not k.startswith(_KOHYA_PREFIXES))
        raise LoraIncompatible(f"'{lora_id}' mixes kohya keys ('{kohya_keys[0]}') with others ('{other}')")
    if kohya_keys:
        weights = LoraWeights(lora_id, "kohya", _parse_kohya(tensors), digest)
    else:
        weights = LoraWeights(lora_id, "diffusers", _parse_diffusers(tensors, header), digest)
    counts = ", ".join(f"{c}: {len(weights.layers[c])}" for c in weights.components)
    logger.info("LoRA %s (%s layout) from %s: %s layers", lora_id, weights.format, file, counts)
    return weights


def _lora_file(path: Path, lora_id: str) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraIncompatible(f"'{lora_id}' is not a .safetensors file (only safetensors are loaded)")
        return path
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return path / DIFFUSERS_WEIGHT_NAME
        files = sorted(f for f in path.glob("*.safetensors") if f.is_file())
        if len(files) == 1:
            return files[0]
        if files:
            names = ", ".join(f.name for f in files)
            raise LoraError(
                f"LoRa repository '{lora_id}' holds several .safetensors files ({names}); "
                f"expected {DIFFUSERS_WEIGHT_NAME} or exactly one"
            )
    raise LoraNotFound(lora_id)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_KOHYA_PREFIXES: Final = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_COMPONENTS: Final = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


@dataclass
class _Parts:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    key: str = ""


def _parse_kohya(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, LoraLayer]]:
    parts: dict[tuple[str, str], _Parts] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        prefix = next(p for p in _KOHYA_COMPONENTS if name.startswith(p))
        component, layer = _KOHYA_COMPONENTS[prefix], name.removeprefix(prefix)
        entry = parts.setdefault((component, layer), _Parts(key=name))
        if suffix == "lora_down.weight":
            entry.down = value
        elif suffix == "lora_up.weight":
            entry.up = value
        elif suffix == "alpha":
            entry.alpha = _scalar(key, value)
        elif suffix == "dora_scale":
            # diffusers drops DoRA scales of kohya files too (with a warning) and merges the rest.
            logger.warning("%s: ignoring DoRA scale (diffusers ignores it as well)", key)
        else:
            raise LoraIncompatible(f"unsupported LoRA layer type '{key}' (only plain LoRA is supported)")
    result: dict[str, dict[str, LoraLayer]] = {}
    flux = any(c == "unet" and _FLUX_BLOCK.match(layer) for c, layer in parts)
    for (component, layer), entry in parts.items():
        down, up = _pair(entry)
        # kohya: scale = alpha / rank, and a layer without alpha has alpha = rank.
        rank = int(down.shape[0])
        scale = 1.0 if entry.alpha is None else entry.alpha / rank
        if flux and component == "unet":
            # sd-scripts' FLUX LoRAs name BFL's modules under lora_unet_: the transformer's layers.
            for name, part in _flux_layers(layer, up, entry.key):
                result.setdefault("transformer", {})[name] = LoraLayer(down, part, scale, entry.key)
            continue
        result.setdefault(component, {})[layer] = LoraLayer(down, up, scale, entry.key)
    return result


# BFL's FLUX module names (what sd-scripts writes) -> diffusers' FluxTransformer2DModel modules, in
# kohya's underscore spelling; a list splits a fused layer's up factor along its rows (the down
# factor is shared), as diffusers' ``_convert_kohya_flux_lora_to_diffusers`` does.
_FLUX_BLOCK: Final = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_FLUX_DOUBLE: Final[dict[str, str | tuple[str, ...]]] = {
    "img_attn_qkv": ("attn_to_q", "attn_to_k", "attn_to_v"),
    "img_attn_proj": "attn_to_out_0",
    "img_mlp_0": "ff_net_0_proj",
    "img_mlp_2": "ff_net_2",
    "img_mod_lin": "norm1_linear",
    "txt_attn_qkv": ("attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"),
    "txt_attn_proj": "attn_to_add_out",
    "txt_mlp_0": "ff_context_net_0_proj",
    "txt_mlp_2": "ff_context_net_2",
    "txt_mod_lin": "norm1_context_linear",
}
_FLUX_SINGLE: Final[dict[str, str | tuple[str, ...]]] = {
    # linear1 fuses q, k, v (inner rows each) and the MLP input (4 x inner rows: FLUX's mlp_ratio).
    "linear1": ("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp"),
    "linear2": "proj_out",
    "modulation_lin": "norm_linear",
}


def _flux_layers(layer: str, up: torch.Tensor, key: str) -> list[tuple[str, torch.Tensor]]:
    """The diffusers modules (underscore names) and up-factor rows of one kohya FLUX layer."""
    match = _FLUX_BLOCK.match(layer)
    table = None if match is None else (_FLUX_DOUBLE if match.group(1) == "double_blocks" else _FLUX_SINGLE)
    target = None if match is None or table is None else table.get(match.group(3))
    if match is None or target is None:
        raise LoraIncompatible(f"unsupported FLUX LoRA layer '{key}'")
    block = ("transformer_blocks_" if match.group(1) == "double_blocks" else "single_transformer_blocks_") + (
        match.group(2)
    )
    if isinstance(target, str):
        return [(f"{block}_{target}", up)]
    rows = int(up.shape[0])
    if len(target) == 3:
        sizes = [rows // 3] * 3
    else:
        inner = rows // 7
        sizes = [inner, inner, inner, rows - 3 * inner]
    if rows % (3 if len(target) == 3 else 7):
        raise LoraIncompatible(
            f"FLUX LoRA layer '{key}' has {rows} output rows; cannot split it into {target}"
        )
    return [(f"{block}_{name}", part) for name, part in zip(target, up.split(sizes), strict=True)]


def _scalar(key: str, value: torch.Tensor) -> float:
    if value.numel() != 1:
        raise LoraIncompatible(f"LoRA alpha '{key}' has shape {list(value.shape)}; expected a scalar")
    return float(value.float().item())


def _pair(entry: _Parts) -> tuple[torch.Tensor, torch.Tensor]:
    if entry.down is None or entry.up is None:
        missing = "down (A)" if entry.down is None else "up (B)"
        raise LoraIncompatible(f"LoRA layer '{entry.key}' has no {missing} weight")
    if entry.down.ndim not in (2, 4) or entry.up.ndim not in (2, 4):
        raise LoraIncompatible(
            f"LoRA layer '{entry.key}' has down {list(entry.down.shape)} and up {list(entry.up.shape)}; "
            "expected 2-d (linear) or 4-d (conv) factors"
        )
    return entry.down, entry.up


# (suffix, part, attention-processor layout) in the order they are tried.
_DIFFUSERS_SUFFIXES: Final = (
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


def _parse_diffusers(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]
) -> dict[str, dict[str, LoraLayer]]:
    parts: dict[tuple[str, str], _Parts] = {}
    for key, value in tensors.items():
        component, rest = "unet", key
        for candidate in ("unet", "transformer", "text_encoder_2", "text_encoder"):
            if key.startswith(f"{candidate}."):
                component, rest = candidate, key.removeprefix(f"{candidate}.")
                break
        if "lora_magnitude_vector" in key or "dora_scale" in key:
            raise LoraIncompatible(f"DoRA layers are not supported ('{key}')")
        found = next((s for s in _DIFFUSERS_SUFFIXES if rest.endswith(s[0])), None)
        if found is None:
            raise LoraIncompatible(f"unsupported LoRA tensor '{key}' (only plain LoRA is supported)")
        suffix, part, processor = found
        module = rest.removesuffix(suffix)
        if processor:
            module = _processor_module(module, component)
        entry = parts.setdefault((component, module), _Parts(key=f"{component}.{module}"))
        if part == "down":
            entry.down = value
        elif part == "up":
            entry.up = value
        else:
            entry.alpha = _scalar(key, value)
    configs = _adapter_configs(header)
    result: dict[str, dict[str, LoraLayer]] = {}
    for (component, module), entry in parts.items():
        down, up = _pair(entry)
        scale = _peft_scale(configs.get(component), module, int(down.shape[0]), entry)
        result.setdefault(component, {})[module] = LoraLayer(down, up, scale, entry.key)
    return result


def _processor_module(module: str, component: str) -> str:
    head, _, proj = module.rpartition(".")
    head = head.removesuffix(".processor")
    table = _PROCESSOR_NAMES["unet" if component == "unet" else "text"]
    if proj not in table:
        raise LoraIncompatible(f"unsupported attention-processor LoRA layer '{module}'")
    return f"{head}.{table[proj]}"


def _adapter_configs(header: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata``: ``{"unet.r": 4, "unet.lora_alpha": 8, ...}`` per component."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise LoraIncompatible(f"unreadable {METADATA_KEY} in the safetensors header: {e}") from e
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, dot, name = key.partition(".")
        if dot and component in COMPONENTS:
            configs.setdefault(component, {})[name] = value
    return configs


def _peft_scale(config: Mapping[str, Any] | None, module: str, rank: int, entry: _Parts) -> float:
    """PEFT's ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), patterns honoured."""
    if config is None:
        # No adapter config: an explicit alpha tensor, else diffusers' convention alpha = rank.
        return 1.0 if entry.alpha is None else entry.alpha / rank
    if config.get("use_dora"):
        raise LoraIncompatible(f"DoRA adapters are not supported ('{entry.key}')")
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if int(r) != rank:
        raise LoraIncompatible(f"LoRA layer '{entry.key}' has rank {rank} but its adapter config says r={r}")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches a dotted suffix of the module name."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:
            raise LoraIncompatible(f"invalid module pattern '{pattern}' in the adapter config: {e}") from e
    return default


# --------------------------------------------------------------------------------------------
# 2. Name resolution and merging


class _Resolver:
    """Maps LoRA layer names to the module names of one base component."""

    def __init__(self, component: str, module_names: frozenset[str]) -> None:
        self.component = component
        self.names = module_names
        self.underscored: dict[str, str | None] = {}
        for name in module_names:
            flat = name.replace(".", "_")
            # Two modules with one underscore spelling cannot be told apart: never guess.
            self.underscored[flat] = None if flat in self.underscored else name
        self._layers_per_block: int | None = None

    def diffusers(self, key: str) -> str | None:
        for candidate in self._text_model_variants(key, "."):
            if candidate in self.names:
                return candidate
        return None

    def kohya(self, key: str) -> str | None:
        for candidate in self._text_model_variants(key, "_"):
            found = self.underscored.get(candidate)
            if found is not None:
                return found
        if self.component == "unet":
            sgm = self._from_sgm(key)
            if sgm is not None:
                return self.underscored.get(sgm)
        return None

    def _text_model_variants(self, key: str, sep: str) -> Iterable[str]:
        # transformers 5 flattened CLIPTextModel (``encoder.layers...``) but not
        # CLIPTextModelWithProjection (``text_model.encoder.layers...``); files use either.
        yield key
        if self.component != "unet":
            prefix = f"text_model{sep}"
            yield key.removeprefix(prefix) if key.startswith(prefix) else prefix + key

    # SGM (the original LDM UNet) names, as kohya's SDXL trainer writes them.
    _SGM_TOP: Final = {
        "input_blocks_0_0": "conv_in",
        "out_2": "conv_out",
        "time_embed_0": "time_embedding_linear_1",
        "time_embed_2": "time_embedding_linear_2",
        "label_emb_0_0": "add_embedding_linear_1",
        "label_emb_0_2": "add_embedding_linear_2",
    }
    _SGM_RESNET: Final = {
        "in_layers_2": "conv1",
        "out_layers_3": "conv2",
        "emb_layers_1": "time_emb_proj",
        "skip_connection": "conv_shortcut",
    }
    _SGM_BLOCK: Final = re.compile(r"^(input_blocks|middle_block|output_blocks)_(\d+)(?:_(\d+))?_(.+)$")

    def _from_sgm(self, key: str) -> str | None:
        """The diffusers underscore name of an SGM-layout name, built from this UNet's block layout."""
        if key in self._SGM_TOP:
            return self._SGM_TOP[key]
        match = self._SGM_BLOCK.match(key)
        if match is None:
            return None
        kind, first, second, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        per_block = self.layers_per_block()
        if per_block is None:
            return None
        group = per_block + 1
        if kind == "middle_block":
            # middle_block_<j>_<rest>: 0 = resnet 0, 1 = attention, 2 = resnet 1.
            rest = f"{second}_{rest}" if second is not None else rest
            target = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(first)
            return None if target is None else self._sgm_inner(f"mid_block_{target}", rest)
        if second is None:
            return None
        slot = int(second)
        if kind == "input_blocks":
            block, layer = divmod(first - 1, group)
            base = f"down_blocks.{block}"
            if layer == per_block:
                return self._sgm_inner(f"down_blocks_{block}_downsamplers_0", re.sub(r"^op", "conv", rest))
            inner = {0: "resnets", 1: "attentions"}.get(slot)
        else:
            block, layer = divmod(first, group)
            base = f"up_blocks.{block}"
            has_attention = any(n.startswith(f"{base}.attentions.") for n in self.names)
            if slot == 2 or (slot == 1 and not has_attention):
                return self._sgm_inner(f"up_blocks_{block}_upsamplers_0", rest)
            inner = {0: "resnets", 1: "attentions"}.get(slot)
        if inner is None:
            return None
        return self._sgm_inner(f"{base.replace('.', '_')}_{inner}_{layer}", rest)

    def _sgm_inner(self, head: str, rest: str) -> str:
        for sgm, diffusers in self._SGM_RESNET.items():
            if rest == sgm or rest.startswith(f"{sgm}_"):
                rest = diffusers + rest.removeprefix(sgm)
                break
        return f"{head}_{rest}"

    def layers_per_block(self) -> int | None:
        if self._layers_per_block is None:
            indices = [
                int(m.group(1)) for n in self.names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))
            ]
            self._layers_per_block = max(indices) + 1 if indices else None
        return self._layers_per_block


MergeTerms = list[tuple[LoraLayer, float]]


def plan_merge(
    shapes: Mapping[str, tuple[int, ...]],
    loras: Sequence[tuple[LoraWeights, float]],
    component: str,
) -> dict[str, MergeTerms]:
    """What merging ``loras`` into ``component`` changes: ``{param: [(layer, strength * scale)]}``.

    ``shapes`` maps each of the component's parameter names to its shape (only the touched ones are
    looked up, so a lazy mapping reads nothing else). Every layer is checked against the base, a
    LoRA with strength 0 too, though it adds no term. Raises :class:`LoraIncompatible` when a layer
    names a module the base lacks or its shapes do not fit. Cheap: no tensor is multiplied.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    names = frozenset(k.removesuffix(".weight") for k in shapes if k.endswith(".weight"))
    terms: dict[str, MergeTerms] = {}
    for lora, strength in loras:
        for module, layer in lora.resolve(component, names).items():
            param = f"{module}.weight"
            layer.check(tuple(shapes[param]), f"{component} module '{module}'")
            if strength != 0:
                terms.setdefault(param, []).append((layer, float(strength) * layer.scale))
    return terms


def merged_weight(base: torch.Tensor, terms: MergeTerms, *, overwrite: bool = False) -> torch.Tensor:
    """``base + sum(factor * up @ down)`` computed in float32, returned in ``base``'s dtype.

    Each term is one fused in-place GEMM (``addmm_``) on the weight seen as ``[out, fan_in]``; no
    delta tensor is allocated. ``overwrite``: a float32 ``base`` is the caller's own buffer and is
    merged in place (what a streamed variant build does with the weight it has just read).
    """
    import torch

    if overwrite and base.dtype == torch.float32 and base.is_contiguous():
        weight = base
    else:
        weight = base.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    flat = weight.view(weight.shape[0], -1)
    for layer, factor in terms:
        flat.addmm_(layer.up.flatten(1).float(), layer.down.flatten(1).float(), alpha=factor)
    return weight if weight.dtype == base.dtype else weight.to(base.dtype)


class _Shapes(Mapping[str, tuple[int, ...]]):
    """The shapes of a state dict's tensors, each looked up when asked for."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def merge_deltas(
    base_state: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[LoraWeights, float]],
    component: str,
) -> dict[str, torch.Tensor]:
    """The merged weights of ``component``: ``{param: W + sum_i weight_i * scale_i * (B_i @ A_i)}``.

    ``base_state`` is the component's own state dict (``unet.state_dict()``, the CLIP model's),
    ``loras`` pairs of a LoRA and its strength. Only the parameters some LoRA touches are returned,
    computed in float32 and stored in the base weight's dtype; ``base_state`` is left as it is. See
    :func:`plan_merge` for what is checked.
    """
    terms = plan_merge(_Shapes(base_state), loras, component)
    merged = {param: merged_weight(base_state[param], t) for param, t in terms.items()}
    logger.info(
        "%s: merged %d LoRA(s) into %d parameters", component, sum(1 for _, w in loras if w), len(merged)
    )
    return merged


def check_components(lora: LoraWeights, available: Collection[str]) -> None:
    """Raise :class:`LoraIncompatible` if ``lora`` has layers for a component the model lacks
    (e.g. an SDXL LoRA's ``text_encoder_2`` layers on an SD 1.5 model)."""
    extra = [c for c in lora.components if c not in available]
    if extra:
        raise LoraIncompatible(
            f"'{lora.source}' has layers for {', '.join(extra)}, which the base model does not have"
        )


def load_base_state(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    """The state dict of one component of a diffusers folder, as the exporter loads it.

    Loaded through :func:`export.models.modules.components`, so the parameter names are the ones the
    ONNX initializers carry (after :data:`ONNX_PREFIXES`); text encoders in particular get the
    names of the installed transformers version, whatever the files on disk use.
    """
    from export.models.modules import components
    from export.models.source import ModelSource

    prefix = ONNX_PREFIXES[component]
    for part in components(ModelSource(Path(model_dir))):
        if part.spec.name == component:
            state = part.load().state_dict()
            return {k.removeprefix(prefix): v.detach() for k, v in state.items() if k.startswith(prefix)}
    raise ValueError(f"{model_dir} has no component {component!r}")


# --------------------------------------------------------------------------------------------
# 3. ONNX graphs with merged initializers


def initializer_map(onnx_path: Path, module_prefix: str) -> dict[str, str]:
    """``{torch parameter name: ONNX initializer name}`` for initializers named ``module_prefix + param``.

    ``module_prefix`` is where the model sits in the exported wrapper (:data:`ONNX_PREFIXES`).
    Reads only the graph, not external weight files.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {
        init.name.removeprefix(module_prefix): init.name
        for init in model.graph.initializer
        if init.name.startswith(module_prefix)
    }


@dataclass
class OnnxGraph:
    """An exported graph with its weights in memory (external data included), read once and shared
    by :func:`onnx_state` and :func:`write_merged_onnx`."""

    path: Path
    model: onnx.ModelProto
    external: bool  # whether the file keeps its weights in external data


def load_graph(path: Path) -> OnnxGraph:
    import onnx
    from onnx import external_data_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    external = any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    if external:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    return OnnxGraph(path, model, external)


def onnx_state(graph: Path | OnnxGraph, module_prefix: str) -> dict[str, torch.Tensor]:
    """The model's parameters as the exported graph stores them: ``{torch parameter name: tensor}``.

    The base state for :func:`merge_deltas` when only the model repository is at hand (the service
    holds no torch weights). ``module_prefix`` as in :func:`initializer_map`; external data is read.
    """
    import torch
    from onnx import numpy_helper

    graph = graph if isinstance(graph, OnnxGraph) else load_graph(graph)
    return {
        init.name.removeprefix(module_prefix): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in graph.model.graph.initializer
        if init.name.startswith(module_prefix)
    }


def write_merged_onnx(
    base_onnx: Path | OnnxGraph, deltas: Mapping[str, torch.Tensor], out: Path, prefix: str
) -> Path:
    """Copy ``base_onnx`` to ``out`` with the initializers of ``deltas`` (``{param: merged weight}``)
    replaced; every other byte of the graph stays as it is.  A loaded :class:`OnnxGraph` is changed
    in place (load it again to reuse the base).

    A base stored with external data (models over 2 GB) is written the same way, to one
    ``<out name>.data`` file beside ``out``. Raises :class:`OnnxWeightsError` if a parameter has no
    initializer of its own (e.g. a graph exported with constant folding) or its shape differs.
    """
    import onnx
    from onnx import numpy_helper

    graph = base_onnx if isinstance(base_onnx, OnnxGraph) else load_graph(base_onnx)
    base_onnx, model, external, out = graph.path, graph.model, graph.external, Path(out)
    by_name = {init.name: i for i, init in enumerate(model.graph.initializer)}
    missing = [p for p in deltas if f"{prefix}{p}" not in by_name]
    if missing:
        raise OnnxWeightsError(
            f"{base_onnx} has no initializer for {len(missing)} merged parameter(s), e.g. "
            f"'{prefix}{missing[0]}'; the graph must be exported with named initializers "
            "(export_onnx without constant folding, EXPORT_VERSION >= 2)"
        )
    for param, value in deltas.items():
        index = by_name[f"{prefix}{param}"]
        old = model.graph.initializer[index]
        array = value.detach().cpu().numpy()
        if tuple(old.dims) != array.shape:
            raise OnnxWeightsError(
                f"{base_onnx}: initializer '{old.name}' has shape {list(old.dims)}, merged '{param}' "
                f"has {list(array.shape)}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(dtype), old.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(model, out, external)
    logger.info("wrote %s with %d merged initializers", out, len(deltas))
    return out


def _save(model: onnx.ModelProto, out: Path, external: bool) -> None:
    import onnx

    if not external:
        onnx.save(model, str(out))
        return
    data = out.with_name(f"{out.name}.data")
    # onnx appends to an existing data file: start from an empty one.
    data.unlink(missing_ok=True)
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
