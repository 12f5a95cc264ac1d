"""The service's images equal diffusers' own pipeline on the same model folder, seed for seed.

Integration: real bundled Triton, the service over HTTP, once per Triton target (the ``target``
fixture: python-onnx and python-torch).  Tolerance: 2 of 255 on every pixel.  diffusers' reference
images are computed once and shared by both targets.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.support.images import TOLERANCE, assert_close, decode, generate, reference_image

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
