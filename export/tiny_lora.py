"""Tiny random LoRA files for the tiny models of :mod:`export.tiny`, built in code for tests.

Two layouts, the two that :mod:`export.lora` reads and diffusers' ``load_lora_weights`` accepts:

- ``"diffusers"``: what a diffusers/PEFT training script saves. A PEFT adapter
  (``r=4, lora_alpha=8``, so every layer has scale 2) is added to the UNet's attention projections
  (and, with ``text_encoder=True``, to the CLIP encoders' ``q/k/v/out_proj``), its state dict is
  taken with ``get_peft_model_state_dict`` and written by the pipeline's ``save_lora_weights``
  together with the adapter metadata (``peft_config.to_dict()``, as diffusers'
  ``_collate_lora_metadata`` does), which is where diffusers reads ``lora_alpha`` from.
- ``"kohya"``: a kohya-ss / A1111 file written by hand: ``lora_unet_<module_with_underscores>``
  with ``lora_down`` / ``lora_up`` / ``alpha`` for attention projections, feed-forward layers,
  ``proj_in`` / ``proj_out`` (1x1 convs on SD, linears on SDXL), resnet 3x3 and 1x1 convs, time
  embedding projections and down/upsampler convs. Linear layers get rank 4, conv layers rank 2 (so
  the file mixes ranks); every layer has ``alpha = 2``, so scales are 0.5 and 1.
  With ``sgm_names=True`` (SDXL only) the UNet names use the original SGM/LDM block layout
  (``input_blocks_4_1_...``) as kohya's SDXL trainer writes them.

The LoRA factors are random (nonzero ``up``/``B``), drawn under ``torch.manual_seed(seed)``, so a
seed always gives the same file. Only the architecture of the base model matters: its configs are
read from ``model_dir`` (a tiny model folder); without one the tiny model is built first.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, cast

from export.tiny import Family, build_tiny_model

__all__ = ["LoraFormat", "build_tiny_lora"]

logger = logging.getLogger(__name__)

LoraFormat = Literal["diffusers", "kohya"]

DIFFUSERS_RANK = 4
DIFFUSERS_ALPHA = 8
KOHYA_LINEAR_RANK = 4
KOHYA_CONV_RANK = 2
KOHYA_ALPHA = 2.0

_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Module-name endings (of the diffusers UNet) that the kohya file covers.
_KOHYA_UNET = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out"
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$"
)
_KOHYA_TEXT = re.compile(r"layers\.[01]\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1)$")


def build_tiny_lora(
    family: Family,
    out_path: Path,
    fmt: LoraFormat,
    seed: int = 0,
    *,
    model_dir: Path | None = None,
    text_encoder: bool = False,
    sgm_names: bool = False,
) -> Path:
    """Write a random LoRA for the tiny ``family`` model and return ``out_path``.

    ``out_path`` ending in ``.safetensors`` is the file itself; anything else is a folder that gets
    ``pytorch_lora_weights.safetensors`` (diffusers' own file name) or ``lora.safetensors`` (kohya).
    ``text_encoder`` adds LoRA layers for the text encoder(s) too.
    """
    import torch

    out_path = Path(out_path)
    if sgm_names and (fmt != "kohya" or family != "sdxl"):
        raise ValueError("sgm_names applies to kohya LoRAs for the sdxl family only")
    if model_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return build_tiny_lora(
                family,
                out_path,
                fmt,
                seed,
                model_dir=build_tiny_model(family, Path(tmp) / "model"),
                text_encoder=text_encoder,
                sgm_names=sgm_names,
            )
    if out_path.suffix == ".safetensors":
        folder, file_name = out_path.parent, out_path.name
    else:
        folder = out_path
        file_name = "pytorch_lora_weights.safetensors" if fmt == "diffusers" else "lora.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    encoders = _text_encoder_names(family) if text_encoder else ()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if fmt == "diffusers":
            _write_diffusers(family, Path(model_dir), folder, file_name, encoders)
        elif fmt == "kohya":
            _write_kohya(Path(model_dir), folder / file_name, encoders, sgm_names)
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}; expected 'diffusers' or 'kohya'")
    logger.info("wrote tiny %s LoRA (%s, seed %d) to %s", family, fmt, seed, folder / file_name)
    return out_path


def _text_encoder_names(family: Family) -> tuple[str, ...]:
    return ("text_encoder",) if family == "sd" else ("text_encoder", "text_encoder_2")


def _unet(model_dir: Path) -> Any:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_dir / "unet")
    return UNet2DConditionModel.from_config(config)


def _text_model(model_dir: Path, name: str) -> Any:
    """The encoder in its own class: SDXL's second encoder is a ``CLIPTextModelWithProjection``,
    whose module names (``text_model.encoder...``) differ from ``CLIPTextModel``'s (``encoder...``)
    in transformers 5."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(model_dir / name)
    with_projection = "WithProjection" in "".join(config.architectures or [])
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _write_diffusers(
    family: Family, model_dir: Path, folder: Path, file_name: str, encoders: tuple[str, ...]
) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    kwargs: dict[str, Any] = {}
    parts: list[tuple[str, Any, list[str]]] = [("unet", _unet(model_dir), _UNET_TARGETS)]
    parts += [(name, _text_model(model_dir, name), _TEXT_TARGETS) for name in encoders]
    for name, model, targets in parts:
        config = LoraConfig(
            r=DIFFUSERS_RANK,
            lora_alpha=DIFFUSERS_ALPHA,
            target_modules=targets,
            init_lora_weights=False,
        )
        model.add_adapter(config)
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    pipeline = cast(Any, StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline)
    pipeline.save_lora_weights(folder, weight_name=file_name, **kwargs)


def _write_kohya(model_dir: Path, path: Path, encoders: tuple[str, ...], sgm_names: bool) -> None:
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    unet = _unet(model_dir)
    layers_per_block = int(unet.config.layers_per_block)
    module_names = {name for name, _ in unet.named_modules()}
    for name, module in unet.named_modules():
        if _KOHYA_UNET.search(name):
            key = _sgm_name(name, layers_per_block, module_names) if sgm_names else name.replace(".", "_")
            _add_kohya_layer(tensors, f"lora_unet_{key}", module)
    for encoder in encoders:
        prefix = {
            "text_encoder": "lora_te1" if len(encoders) > 1 else "lora_te",
            "text_encoder_2": "lora_te2",
        }
        model = _text_model(model_dir, encoder)
        for name, module in model.named_modules():
            if _KOHYA_TEXT.search(name):
                # kohya names keep transformers 4's ``text_model.`` level.
                key = ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
                _add_kohya_layer(tensors, f"{prefix[encoder]}_{key}", module)
    metadata = {"ss_network_module": "networks.lora", "ss_network_alpha": str(KOHYA_ALPHA)}
    save_file(tensors, str(path), metadata=metadata)


def _add_kohya_layer(tensors: dict[str, Any], key: str, module: Any) -> None:
    import torch
    from torch import nn

    if isinstance(module, nn.Linear):
        rank = KOHYA_LINEAR_RANK
        down = torch.randn(rank, module.in_features)
        up = torch.randn(module.out_features, rank)
    elif isinstance(module, nn.Conv2d):
        rank = KOHYA_CONV_RANK
        kh, kw = module.kernel_size
        down = torch.randn(rank, module.in_channels, kh, kw)
        up = torch.randn(module.out_channels, rank, 1, 1)
    else:
        raise TypeError(f"{key}: cannot put a LoRA on {type(module).__name__}")
    # Small factors, so merged weights stay in the range of the base weights.
    tensors[f"{key}.lora_down.weight"] = (down * 0.1).contiguous()
    tensors[f"{key}.lora_up.weight"] = (up * 0.1).contiguous()
    tensors[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA)


def _sgm_name(name: str, layers_per_block: int, module_names: set[str]) -> str:
    """The kohya SDXL (SGM/LDM layout) spelling of a diffusers UNet module name, with underscores."""
    leaf_names = {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    }
    parts = name.split(".")
    group = layers_per_block + 1
    kind = parts[2] if parts[0] != "mid_block" else parts[1]
    if parts[0] == "down_blocks":
        block, index, rest = int(parts[1]), int(parts[3]), parts[4:]
        if kind == "downsamplers":
            head = f"input_blocks_{1 + block * group + layers_per_block}_0"
            rest = ["op" if p == "conv" else p for p in rest]
        else:
            head = f"input_blocks_{1 + block * group + index}_{0 if kind == 'resnets' else 1}"
    elif parts[0] == "mid_block":
        index, rest = int(parts[2]), parts[3:]
        head = f"middle_block_{1 if kind == 'attentions' else 2 * index}"
    elif parts[0] == "up_blocks":
        block, index, rest = int(parts[1]), int(parts[3]), parts[4:]
        if kind == "upsamplers":
            # The upsampler is the last layer of the block's last output block, after its resnet
            # (slot 1) or its resnet and attention (slot 2).
            slot = 2 if f"up_blocks.{block}.attentions" in module_names else 1
            head = f"output_blocks_{block * group + group - 1}_{slot}"
        else:
            head = f"output_blocks_{block * group + index}_{0 if kind == 'resnets' else 1}"
    else:
        raise ValueError(f"no SGM name for {name}")
    if kind == "resnets" and rest and rest[0] in leaf_names:
        rest = [leaf_names[rest[0]], *rest[1:]]
    return "_".join([head, *rest])
