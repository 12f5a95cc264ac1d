"""The service's images equal diffusers' own pipeline on the same model folder, seed for seed.

Integration: real bundled Triton, the service over HTTP, once per Triton target (the ``target``
fixture: python-onnx and python-torch).  Tolerance: 2 of 255 on every pixel.  diffusers' reference
images are computed once and shared by both targets.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

TOLERANCE = 2
STEPS = 8
SEEDS = (0, 1, 42)
# (family, scheduler override): the model's own scheduler and an ancestral Euler one, whose noise
# must come from the same seeded generator as diffusers'.
SCHEDULERS = (
    ("sd", ""),
    ("sd", "EulerAncestralDiscreteScheduler"),
    ("sdxl", ""),
    ("sdxl", "EulerAncestralDiscreteScheduler"),
)


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


@pytest.mark.parametrize(("family", "scheduler"), SCHEDULERS)
@pytest.mark.parametrize("guidance_scale", [7.5, 0.0])
def test_matches_diffusers(
    family: str,
    scheduler: str,
    guidance_scale: float,
    target: str,
    service: Callable[..., str],
    tiny_model: Callable[[str], Path],
) -> None:
    url = service(family, target, scheduler=scheduler)
    body = {
        "prompt": "a photo of a cat",
        "height": 64,
        "width": 96,
        "guidance_scale": guidance_scale,
        "num_inference_steps": STEPS,
    }
    # The seeds' requests run at once, so their UNet steps share Triton's dynamic batches.
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        answers = list(pool.map(lambda seed: generate(url, **body, seed=seed), SEEDS))
    for seed, (image,) in zip(SEEDS, answers, strict=True):
        assert image["seed"] == seed
        assert image["nsfw"] is False
        expected = reference_image(
            tiny_model(family),
            scheduler,
            seed=seed,
            prompt="a photo of a cat",
            height=64,
            width=96,
            guidance_scale=guidance_scale,
            num_inference_steps=STEPS,
        )
        assert_close(decode(image["url"]), expected)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_negative_prompt_and_square_size(
    family: str, target: str, service: Callable[..., str], tiny_model: Callable[[str], Path]
) -> None:
    url = service(family, target)
    (image,) = generate(
        url,
        prompt="a red house",
        negative_prompt="blurry",
        height=96,
        width=96,
        num_inference_steps=STEPS,
        seed=7,
    )
    expected = reference_image(
        tiny_model(family),
        "",
        seed=7,
        prompt="a red house",
        negative_prompt="blurry",
        height=96,
        width=96,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
    )
    assert_close(decode(image["url"]), expected)


def test_sdxl_splits_prompt_per_text_encoder(
    target: str, service: Callable[..., str], tiny_model: Callable[[str], Path]
) -> None:
    url = service("sdxl", target)
    (image,) = generate(
        url,
        prompt="a castle | oil painting",
        negative_prompt="dark|noisy",
        height=64,
        width=64,
        num_inference_steps=STEPS,
        seed=3,
    )
    expected = reference_image(
        tiny_model("sdxl"),
        "",
        seed=3,
        prompt="a castle",
        prompt_2="oil painting",
        negative_prompt="dark",
        negative_prompt_2="noisy",
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
    )
    assert_close(decode(image["url"]), expected)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_images_per_prompt_use_consecutive_seeds(
    family: str, target: str, service: Callable[..., str]
) -> None:
    url = service(family, target)
    body = {"prompt": "a tree", "height": 64, "width": 64, "num_inference_steps": STEPS}
    images = generate(url, **body, seed=100, num_images_per_prompt=3)
    assert [i["seed"] for i in images] == [100, 101, 102]
    for image in images:
        (single,) = generate(url, **body, seed=image["seed"])
        assert_close(decode(image["url"]), decode(single["url"]))
    assert (
        np.abs(decode(images[0]["url"]).astype(int) - decode(images[1]["url"]).astype(int)).max() > TOLERANCE
    )


def test_random_seed_is_reported_and_reproducible(target: str, service: Callable[..., str]) -> None:
    url = service("sd", target)
    body = {"prompt": "a boat", "height": 64, "width": 64, "num_inference_steps": 4}
    (first,) = generate(url, **body)
    (again,) = generate(url, **body, seed=first["seed"])
    assert_close(decode(first["url"]), decode(again["url"]))
