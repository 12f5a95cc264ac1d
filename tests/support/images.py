"""The service's images against diffusers' own pipeline: decoding the answer, diffusers' reference
image for a seed (cached per model, scheduler and request), and the tolerance they must meet."""

from __future__ import annotations

import base64
import io
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

# Every pixel within 2 of 255 of diffusers' image.
TOLERANCE = 2


@cache
def _pipeline(model_dir: str, scheduler: str) -> Any:
    import diffusers

    cls = (
        diffusers.StableDiffusionXLPipeline
        if "sdxl" in Path(model_dir).name
        else diffusers.StableDiffusionPipeline
    )
    kwargs = {} if cls is diffusers.StableDiffusionXLPipeline else {"safety_checker": None}
    pipe = cls.from_pretrained(model_dir, **kwargs)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(model_dir: Path, scheduler: str, *, seed: int, **kwargs: Any) -> np.ndarray:
    """diffusers' image for ``seed`` as uint8 HWC, rounded as its PIL output is."""
    return _reference_image(str(model_dir), scheduler, seed, tuple(sorted(kwargs.items()))).copy()


@cache
def _reference_image(
    model_dir: str, scheduler: str, seed: int, kwargs: tuple[tuple[str, Any], ...]
) -> np.ndarray:
    pipe = _pipeline(model_dir, scheduler)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(generator=generator, output_type="np", **dict(kwargs)).images[0]
    return np.asarray((out * 255).round().astype(np.uint8))


def decode(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB"))


def generate(base_url: str, **body: Any) -> list[dict[str, Any]]:
    response = httpx.post(f"{base_url}/text-to-image", json=body, timeout=300)
    assert response.status_code == 200, response.text
    images: list[dict[str, Any]] = response.json()["images"]
    return images


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= TOLERANCE, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"
