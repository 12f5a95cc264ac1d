"""Full-size SD 1.5 and SDXL architectures with random weights, saved as Hub repositories are saved.

The configs are the published ones (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``), written here so nothing is downloaded; random weights
cost what trained ones cost.  Each module is built, saved with ``save_pretrained`` (fp32:
``*.safetensors``), then cast with ``.half()`` and saved again with ``save_pretrained(variant="fp16")``
(``*.fp16.safetensors``, and transformers configs that then say ``"dtype": "float16"``), one module at a
time so building SDXL needs about its UNet's fp32 size in memory.

``python -m bench.realscale_models {sd,sdxl} OUT``
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Final

import torch

logger = logging.getLogger(__name__)

_CLIP_L: Final[dict[str, Any]] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_OPENCLIP_BIGG: Final[dict[str, Any]] = {
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_VIT_L14: Final[dict[str, Any]] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
}
_VAE: Final[dict[str, Any]] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
_SD_UNET: Final[dict[str, Any]] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
_SDXL_UNET: Final[dict[str, Any]] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def _save(module: Any, folder: Path) -> None:
    """``save_pretrained`` in fp32, then in fp16 as ``variant="fp16"``, then free the module."""
    start = time.perf_counter()
    module.save_pretrained(folder)
    module.half().save_pretrained(folder, variant="fp16")
    params = sum(p.numel() for p in module.parameters())
    elapsed = time.perf_counter() - start
    logger.info("%s: %.0fM parameters saved in %.0f s", folder.name, params / 1e6, elapsed)


def build(family: str, out: Path) -> Path:
    """Write the full-size ``family`` ("sd" or "sdxl") repository to ``out``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from export.fixtures.tiny_pipelines import _SD_SCHEDULER, _SDXL_SCHEDULER
    from export.models.tokenizer import EOS_TOKEN, write_clip_tokenizer

    sdxl = family == "sdxl"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _save(UNet2DConditionModel(**(_SDXL_UNET if sdxl else _SD_UNET)), out / "unet")
    gc.collect()
    scaling = 0.13025 if sdxl else 0.18215
    _save(AutoencoderKL(**_VAE, scaling_factor=scaling, sample_size=1024 if sdxl else 512), out / "vae")
    if sdxl:
        _save(CLIPTextModel(CLIPTextConfig(**_CLIP_L)), out / "text_encoder")
        _save(CLIPTextModelWithProjection(CLIPTextConfig(**_OPENCLIP_BIGG)), out / "text_encoder_2")
        write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN)
        write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
        EulerDiscreteScheduler(**_SDXL_SCHEDULER).save_pretrained(out / "scheduler")
    else:
        _save(CLIPTextModel(CLIPTextConfig(**_CLIP_L)), out / "text_encoder")
        write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN)
        PNDMScheduler(**_SD_SCHEDULER).save_pretrained(out / "scheduler")
        _save_safety_checker(out)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": _version("diffusers"),
        "scheduler": ["diffusers", "EulerDiscreteScheduler" if sdxl else "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
        }
    else:
        index |= {
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "requires_safety_checker": True,
        }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def _save_safety_checker(out: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from export.models.safety import _processor_kwargs

    text = {k: v for k, v in _CLIP_L.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = CLIPConfig(text_config=text, vision_config=_VIT_L14, projection_dim=768)
    _save(StableDiffusionSafetyChecker(config), out / "safety_checker")
    CLIPImageProcessorPil(**_processor_kwargs()).save_pretrained(out / "feature_extractor")
    preprocessor = out / "feature_extractor" / "preprocessor_config.json"
    saved = json.loads(preprocessor.read_text())
    saved["image_processor_type"] = "CLIPImageProcessor"
    preprocessor.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realscale_models", description=__doc__)
    parser.add_argument("family", choices=("sd", "sdxl"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    build(args.family, args.out)
    logger.info("%s written to %s in %.0f s", args.family, args.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
