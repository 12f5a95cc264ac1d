"""SD3 and FLUX over HTTP equal diffusers' StableDiffusion3Pipeline / FluxPipeline, seed for seed.

Integration: the tiny SD3 and FLUX (dev-like: guidance embedding, dynamic shifting) models exported
to ONNX, the real bundled Triton, the service over HTTP.  Tolerance: 2 of 255 on every pixel.
Cost (2 shared cores): building and exporting both tiny models and starting their Triton servers
takes about a minute per family, shared by every test here (session fixtures).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.support.images import TOLERANCE, assert_close, decode, generate

pytestmark = pytest.mark.slow

STEPS = 4
SEEDS = (0, 1, 42)
# diffusers' defaults: SD3 pads T5 to 256 tokens, FLUX to 512; the tiny models' folder names match
# no model rule, so the service uses the same.
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


@cache
def _pipeline(model_dir: str) -> Any:
    import diffusers

    cls = (
        diffusers.FluxPipeline
        if Path(model_dir).name.startswith("tiny-flux")
        else diffusers.StableDiffusion3Pipeline
    )
    pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(model_dir: Path, family: str, *, seed: int, **kwargs: Any) -> np.ndarray:
    pipe = _pipeline(str(model_dir))
    out = pipe(
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        max_sequence_length=MAX_SEQUENCE_LENGTH[family],
        **kwargs,
    ).images[0]
    return np.asarray((out * 255).round().astype(np.uint8))


@pytest.mark.parametrize(("family", "guidance_scale"), [("sd3", 7.0), ("sd3", 0.0), ("flux", 3.5)])
def test_matches_diffusers(
    family: str, guidance_scale: float, service: Callable[..., str], tiny_model: Callable[[str], Path]
) -> None:
    """Three seeds at a non-square size; SD3 with and without classifier-free guidance, FLUX.1-dev-like
    with its guidance embedding (a negative prompt is sent and must be ignored by FLUX)."""
    url = service(family)
    for seed in SEEDS:
        body = {
            "prompt": "a photo of a cat",
            "negative_prompt": "blurry",
            "height": 64,
            "width": 96,
            "guidance_scale": guidance_scale,
            "num_inference_steps": STEPS,
            "seed": seed,
        }
        (image,) = generate(url, **body)
        assert image["seed"] == seed
        kwargs = {"negative_prompt": "blurry"} if family == "sd3" else {}
        expected = reference_image(
            tiny_model(family),
            family,
            seed=seed,
            prompt="a photo of a cat",
            height=64,
            width=96,
            guidance_scale=guidance_scale,
            num_inference_steps=STEPS,
            **kwargs,
        )
        assert_close(decode(image["url"]), expected)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_parts_go_to_their_encoders(
    family: str, service: Callable[..., str], tiny_model: Callable[[str], Path]
) -> None:
    url = service(family)
    prompt = "a castle | oil painting | at night" if family == "sd3" else "a castle | oil painting"
    (image,) = generate(
        url, prompt=prompt, negative_prompt="dark|noisy", height=96, width=64,
        guidance_scale=5.0, num_inference_steps=STEPS, seed=3,
    )  # fmt: skip
    if family == "sd3":
        kwargs = {
            "prompt": "a castle",
            "prompt_2": "oil painting",
            "prompt_3": "at night",
            "negative_prompt": "dark",
            "negative_prompt_2": "noisy",
        }
    else:
        kwargs = {"prompt": "a castle", "prompt_2": "oil painting"}
    expected = reference_image(
        tiny_model(family), family, seed=3, height=96, width=64, guidance_scale=5.0,
        num_inference_steps=STEPS, **kwargs,
    )  # fmt: skip
    assert_close(decode(image["url"]), expected)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_images_per_prompt_equal_single_seeds(family: str, service: Callable[..., str]) -> None:
    url = service(family)
    body = {
        "prompt": "a tree",
        "height": 64,
        "width": 64,
        "num_inference_steps": STEPS,
        "guidance_scale": 4.0,
    }
    images = generate(url, **body, seed=100, num_images_per_prompt=3)
    assert [i["seed"] for i in images] == [100, 101, 102]
    for image in images:
        (single,) = generate(url, **body, seed=image["seed"])
        assert_close(decode(image["url"]), decode(single["url"]))
    first, second = (decode(i["url"]).astype(int) for i in images[:2])
    assert np.abs(first - second).max() > TOLERANCE


@pytest.mark.parametrize(
    ("family", "body", "message"),
    [
        ("sd3", {"height": 72}, "height must be a multiple of 16"),
        ("flux", {"width": 104}, "width must be a multiple of 16"),
        ("sd3", {"height": 2048}, "height must be at most 1024"),
        ("sd3", {"prompt": "a | b | c | d"}, "prompt has 4 parts"),
        ("sd3", {"negative_prompt": "a|b|c|d"}, "negative_prompt has 4 parts"),
        ("flux", {"prompt": "a | b | c"}, "prompt has 3 parts"),
    ],
)
def test_bad_input_is_a_clear_400(
    family: str, body: dict[str, Any], message: str, service: Callable[..., str]
) -> None:
    url = service(family)
    request = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 1, **body}
    response = httpx.post(f"{url}/text-to-image", json=request, timeout=120)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]["msg"]
    (image,) = generate(url, prompt="still serving", height=64, width=64, num_inference_steps=1, seed=1)
    assert image["seed"] == 1


def test_flux_schnell_rule_no_guidance_four_steps(
    service: Callable[..., str], tiny_model: Callable[[str], Path]
) -> None:
    """A FLUX.1-schnell-like model (no guidance embedding; its folder name matches the schnell rule):
    the requested guidance is dropped, num_inference_steps < 1 means 4 steps, T5 pads to 256 tokens."""
    url = service("flux-schnell")
    (image,) = generate(
        url, prompt="a photo of a cat", height=64, width=96, guidance_scale=7.5, num_inference_steps=0, seed=5
    )
    pipe = _pipeline(str(tiny_model("flux-schnell")))
    out = pipe(
        prompt="a photo of a cat",
        height=64,
        width=96,
        guidance_scale=0.0,
        num_inference_steps=4,
        max_sequence_length=256,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    assert_close(decode(image["url"]), np.asarray((out * 255).round().astype(np.uint8)))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_lora_matches_diffusers(
    family: str,
    service: Callable[..., str],
    tiny_model: Callable[[str], Path],
    repository: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    """A diffusers-layout transformer LoRA by name under LORA_DIR: the served variant's image equals
    diffusers' ``load_lora_weights`` + ``set_adapters`` at the same strength; the base stays the base."""
    import diffusers

    from tests.support.lora import diffusers_lora

    lora_dir = tmp_path / "loras"
    lora = diffusers_lora(lora_dir / f"{family}-lora.safetensors", family, tiny_model(family), seed=3)
    url = service(family, model_repository=repository(family), lora_dir=lora_dir, lora_hub=False)
    body = {"prompt": "a photo of a cat", "height": 64, "width": 96, "num_inference_steps": STEPS}
    guidance = 7.0 if family == "sd3" else 3.5
    (image,) = generate(
        url, **body, guidance_scale=guidance, seed=5, loras=json.dumps({f"{family}-lora": 0.8})
    )
    cls = diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(tiny_model(family))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.8])
    out = pipe(
        **body,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
        max_sequence_length=MAX_SEQUENCE_LENGTH[family],
    ).images[0]
    assert_close(decode(image["url"]), np.asarray((out * 255).round().astype(np.uint8)))
    (base,) = generate(url, **body, guidance_scale=guidance, seed=5)
    assert np.abs(decode(base["url"]).astype(int) - decode(image["url"]).astype(int)).max() > 2
