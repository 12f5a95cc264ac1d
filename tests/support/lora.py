"""LoRAs in tests: the cases built per family and format, the request body of the LoRA tests and
diffusers' image for it with LoRAs loaded (the reference), and diffusers-layout LoRA files for the
SD3 and FLUX transformers."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import save_file

# (family, format) of the LoRA files the ``lora_dir`` fixture builds.
LORA_CASES = [("sd", "diffusers"), ("sd", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya")]

# guidance explicit: diffusers' SDXL pipeline defaults to 5.0 where the API defaults to 7.5
BODY = {
    "prompt": "a photo of a cat",
    "height": 64,
    "width": 96,
    "num_inference_steps": 6,
    "guidance_scale": 7.5,
}


@cache
def reference_pipeline(model_dir: str, loras: tuple[tuple[str, float], ...]) -> Any:
    import diffusers

    cls = (
        diffusers.StableDiffusionXLPipeline
        if model_dir.endswith("sdxl")
        else diffusers.StableDiffusionPipeline
    )
    kwargs = {} if cls is diffusers.StableDiffusionXLPipeline else {"safety_checker": None}
    pipe = cls.from_pretrained(model_dir, **kwargs)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(model_dir: Path, loras: dict[str, float], seed: int) -> np.ndarray:
    pipe = reference_pipeline(str(model_dir), tuple(loras.items()))
    out = pipe(**BODY, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return np.asarray((out * 255).round().astype(np.uint8))


def post(url: str, loras: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/text-to-image", json={**BODY, "loras": loras, **body}, timeout=300)


# The transformer modules diffusers-layout LoRAs touch, per family.
DIFFUSERS_MODULES = {
    "sd3": (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.1.attn.to_out.0",
        "transformer_blocks.1.ff.net.2",
    ),
    "flux": (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.ff.net.0.proj",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.1.proj_out",
    ),
}


def transformer_pipeline(family: str, model_dir: Path) -> Any:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls.from_pretrained(model_dir)


def diffusers_lora(path: Path, family: str, model_dir: Path, seed: int) -> Path:
    state = transformer_pipeline(family, model_dir).transformer.state_dict()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in DIFFUSERS_MODULES[family]:
        out, fan_in = state[f"{module}.weight"].shape
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, fan_in, generator=gen) * 0.1
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 4, generator=gen) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
