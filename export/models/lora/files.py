"""Reading a LoRA file: :func:`load_lora` -> :class:`~export.models.lora.layers.LoraWeights`.

Ours, not diffusers' ``lora_state_dict``, because the file comes from an operator's folder or the Hub
to a service on the open network: one ``.safetensors`` file only (never a pickle), every tensor
accounted for (an unknown key, a missing factor, a non-scalar alpha, DoRA, LoHa/LoKr are refused with a
:class:`~export.models.lora.layers.LoraIncompatible` naming the key, where diffusers warns and loads
what it recognises), and each layer keeps its own scale: PEFT's ``lora_alpha / r`` from the adapter
metadata (``rank_pattern`` / ``alpha_pattern`` / ``use_rslora``), else its ``.alpha`` tensor over its
rank (diffusers applies the most common alpha to the attention layers of a kohya file whose alphas
differ). kohya FLUX files (sd-scripts' BFL names) are split here too: diffusers'
``_convert_kohya_flux_lora_to_diffusers`` has FLUX.1's sizes built in (19 + 38 blocks, ``linear1`` rows
``[3072] * 3 + [12288]``), so it cannot split the fused layers of any other size; the table below
takes the sizes from the layer itself and splits the up factor as diffusers does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from export.models.lora.layers import (
    COMPONENTS,
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_PREFIXES,
    METADATA_KEY,
    LoraError,
    LoraIncompatible,
    LoraLayer,
    LoraNotFound,
    LoraWeights,
    module_part,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


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
    prefixes = tuple(KOHYA_PREFIXES)
    kohya_keys = [k for k in tensors if k.startswith(prefixes)]
    if kohya_keys and len(kohya_keys) != len(tensors):
        other = next(k for k in tensors if not k.startswith(prefixes))
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
        prefix = next(p for p in KOHYA_PREFIXES if name.startswith(p))
        component, layer = KOHYA_PREFIXES[prefix], name.removeprefix(prefix)
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


# BFL's FLUX module names (what sd-scripts writes) -> diffusers' FluxTransformer2DModel modules; a tuple
# splits a fused layer's up factor along its rows (the down factor is shared), as diffusers'
# ``_convert_kohya_flux_lora_to_diffusers`` does.
_FLUX_BLOCK: Final = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_FLUX_DOUBLE: Final[dict[str, str | tuple[str, ...]]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": "attn.to_out.0",
    "img_mlp_0": "ff.net.0.proj",
    "img_mlp_2": "ff.net.2",
    "img_mod_lin": "norm1.linear",
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": "attn.to_add_out",
    "txt_mlp_0": "ff_context.net.0.proj",
    "txt_mlp_2": "ff_context.net.2",
    "txt_mod_lin": "norm1_context.linear",
}
_FLUX_SINGLE: Final[dict[str, str | tuple[str, ...]]] = {
    # linear1 fuses q, k, v (inner rows each) and the MLP input (4 x inner rows: FLUX's mlp_ratio).
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "modulation_lin": "norm.linear",
}


def _flux_layers(layer: str, up: torch.Tensor, key: str) -> list[tuple[str, torch.Tensor]]:
    """The diffusers modules and up-factor rows of one kohya FLUX layer."""
    match = _FLUX_BLOCK.match(layer)
    table = None if match is None else (_FLUX_DOUBLE if match.group(1) == "double_blocks" else _FLUX_SINGLE)
    target = None if match is None or table is None else table.get(match.group(3))
    if match is None or target is None:
        raise LoraIncompatible(f"unsupported FLUX LoRA layer '{key}'")
    kind = "transformer_blocks" if match.group(1) == "double_blocks" else "single_transformer_blocks"
    block = f"{kind}.{match.group(2)}"
    if isinstance(target, str):
        return [(f"{block}.{target}", up)]
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
    return [(f"{block}.{name}", part) for name, part in zip(target, up.split(sizes), strict=True)]


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
        found = module_part(component, rest)
        if found is None:
            raise LoraIncompatible(f"unsupported LoRA tensor '{key}' (only plain LoRA is supported)")
        module, part = found
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
