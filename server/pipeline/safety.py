"""The safety check: CLIP image preprocessing on the service, the checker model in Triton."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

from export.specs import SAFETY_CHECKER
from server.pipeline.generate import InferenceClient, infer_rows

logger = logging.getLogger(__name__)


class SafetyChecker:
    """``check(images)`` -> one nsfw flag per image, as diffusers' safety checker gives it."""

    def __init__(self, client: InferenceClient, processor: CLIPImageProcessor) -> None:
        self.client = client
        self.processor = processor

    @classmethod
    def from_folders(cls, client: InferenceClient, *candidates: Path) -> SafetyChecker:
        """The preprocessing config from the first folder that has one; CLIP's standard one otherwise."""
        for folder in candidates:
            if (folder / "preprocessor_config.json").is_file():
                return cls(client, CLIPImageProcessor.from_pretrained(folder))
        logger.info("no feature_extractor config found; using CLIP's standard image preprocessing")
        return cls(client, CLIPImageProcessor())

    async def check(self, images: list[np.ndarray]) -> list[bool]:
        pixels = await asyncio.to_thread(self._preprocess, images)
        flags = await infer_rows(self.client, SAFETY_CHECKER, {"pixel_values": pixels}, "has_nsfw")
        return [bool(flag > 0.5) for flag in flags.reshape(-1)]

    def _preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 HWC -> CLIP pixel values, through PIL images as diffusers' pipelines hand them over."""
        pixels = self.processor(images=[Image.fromarray(i) for i in images], return_tensors="np").pixel_values
        return np.ascontiguousarray(pixels, dtype=np.float32)
