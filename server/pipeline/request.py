"""What the service asks the pipeline for: one generation, already checked against the model's rules.

Its own module so that the service and its routes import it without the pipeline's torch and diffusers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Stage(enum.StrEnum):
    """The stages of one generation, as the ``/metrics`` series ``t2i_stage_latency_seconds{stage}``
    names them: the pipeline times the first three, the service the last two."""

    TEXT_ENCODER = "text_encoder"
    UNET_STEP = "unet_step"
    VAE = "vae"
    SAFETY_CHECK = "safety_check"
    PNG_ENCODE = "png_encode"


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    height: int
    width: int
    guidance_scale: float
    num_inference_steps: int
    num_images: int
    seed: int
    # Triton models to run: the base ones, or the merged variants of a LoRA set.
    denoiser: str = ""  # the UNet or transformer; empty: the model's own
    text_encoders: tuple[str, ...] = ()  # empty: the model's own
    # Request parameters per Triton model (a LoRA variant: {"unet": {"lora_variant": key}}).
    model_parameters: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
