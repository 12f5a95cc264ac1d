"""The safety check: CLIP image preprocessing on the service, the checker model in Triton."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from export.contract.specs import CLIP_PREPROCESSOR_CONFIG, PREPROCESSOR_CONFIG, SAFETY_CHECKER
from server.pipeline.generate import InferenceClient, infer_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipPreprocessing:
    """What transformers' ``CLIPImageProcessor`` (its PIL backend, as diffusers' pipelines call it on
    PIL images) does to an image, in PIL and numpy, value for value: resize (the shortest edge to
    ``shortest_edge``, or to ``size``), center-crop to ``crop`` (zero-padded when the image is
    smaller), rescale, normalize, channels first.  Read from a ``preprocessor_config.json`` so the
    service needs no transformers."""

    shortest_edge: int | None
    size: tuple[int, int] | None  # (height, width), when the config names both
    resample: Image.Resampling
    crop: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipPreprocessing:
        """A ``preprocessor_config.json``'s settings, absent keys taking CLIP's standard ones
        (``{}``: CLIP's own preprocessing); ``ValueError`` for one this class does not reproduce."""
        config = {**CLIP_PREPROCESSOR_CONFIG, **config}
        shortest_edge, size = _resize_size(config["size"]) if config["do_resize"] else (None, None)
        normalize = bool(config["do_normalize"])
        return cls(
            shortest_edge=shortest_edge,
            size=size,
            resample=Image.Resampling(int(config["resample"])),
            crop=_crop_size(config["crop_size"]) if config["do_center_crop"] else None,
            rescale=float(config["rescale_factor"]) if config["do_rescale"] else None,
            mean=_channels(config["image_mean"]) if normalize else None,
            std=_channels(config["image_std"]) if normalize else None,
        )

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 HWC RGB images -> float32 pixel values [n, 3, height, width]."""
        return np.ascontiguousarray(np.stack([self._one(image) for image in images]), dtype=np.float32)

    def _one(self, image: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(image).convert("RGB")
        target = self.size or _shortest_edge_size(pil.height, pil.width, self.shortest_edge)
        if target is not None:
            pil = pil.resize((target[1], target[0]), resample=self.resample)
        pixels: np.ndarray = np.asarray(pil)
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        if self.rescale is not None:
            pixels = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
        if self.mean is not None and self.std is not None:
            pixels = pixels.astype(np.float32, copy=False)
            pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return pixels.transpose(2, 0, 1)


def _resize_size(size: Any) -> tuple[int | None, tuple[int, int] | None]:
    """(shortest edge, (height, width)) of a config's ``size``: an int is CLIP's shortest edge."""
    if isinstance(size, int):
        return size, None
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"]), None
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return None, (int(size["height"]), int(size["width"]))
    raise ValueError(f"unsupported size {size!r} in {PREPROCESSOR_CONFIG}")


def _crop_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"unsupported crop_size {size!r} in {PREPROCESSOR_CONFIG}")


def _channels(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values) if isinstance(values, list | tuple) else (float(values),) * 3


def _shortest_edge_size(height: int, width: int, edge: int | None) -> tuple[int, int] | None:
    """The shortest edge to ``edge``, the other in proportion, rounded down."""
    if edge is None:
        return None
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centered ``height`` x ``width`` window of an HWC image; zeros where the image is smaller."""
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    padded = np.zeros(
        (max(height, pixels.shape[0]), max(width, pixels.shape[1]), pixels.shape[2]), pixels.dtype
    )
    pad_top, pad_left = (
        -(-(padded.shape[0] - pixels.shape[0]) // 2),
        -(-(padded.shape[1] - pixels.shape[1]) // 2),
    )
    padded[pad_top : pad_top + pixels.shape[0], pad_left : pad_left + pixels.shape[1]] = pixels
    top, left = max(0, top + pad_top), max(0, left + pad_left)
    return padded[top : top + height, left : left + width]


class SafetyChecker:
    """``check(images)`` -> one nsfw flag per image, as diffusers' safety checker gives it."""

    def __init__(self, client: InferenceClient, preprocessing: ClipPreprocessing) -> None:
        self.client = client
        self.preprocessing = preprocessing

    @classmethod
    def from_folders(cls, client: InferenceClient, *candidates: Path) -> SafetyChecker:
        """The preprocessing config from the first folder that has one; CLIP's standard one otherwise."""
        for folder in candidates:
            if (folder / PREPROCESSOR_CONFIG).is_file():
                config = json.loads((folder / PREPROCESSOR_CONFIG).read_text())
                return cls(client, ClipPreprocessing.from_config(config))
        logger.info("no feature_extractor config found; using CLIP's standard image preprocessing")
        return cls(client, ClipPreprocessing.from_config({}))

    async def check(self, images: list[np.ndarray]) -> list[bool]:
        pixels = await asyncio.to_thread(self.preprocessing, images)
        flags = await infer_rows(self.client, SAFETY_CHECKER, {"pixel_values": pixels}, "has_nsfw")
        return [bool(flag > 0.5) for flag in flags.reshape(-1)]
