"""The mid model of the benchmarks: SD 1.5's UNet at half width with SD 1.5's full text encoder.

Random weights under fixed seeds, built once into ``<work>/models/mid-sd`` (a marker file records its
configs): the tiny SD model (:func:`export.fixtures.tiny.build_tiny_model`) with its UNet and text
encoder replaced. :mod:`bench.variant_build` and :mod:`bench.overhead` measure on it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Final, cast

logger = logging.getLogger(__name__)

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

    from export.fixtures.tiny import MARKER_FILE, build_tiny_model

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
