"""The service's ``nsfw`` flags come from the safety checker model in Triton, as diffusers gives them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from export.models.safety import build_tiny_safety_checker
from export.toolchain.repository import export_repository
from server.settings import Settings
from server.triton.launcher import BundledTriton, TritonLaunchConfig
from tests.support.images import assert_close, decode, generate
from tests.support.service import RunningService, metric, running_service

SEEDS = tuple(range(8))
BODY = {"prompt": "a photo", "height": 64, "width": 64, "num_inference_steps": 2}


def _images(pipe: diffusers.StableDiffusionPipeline, seed: int) -> tuple[np.ndarray, bool | None]:
    out = pipe(**BODY, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    nsfw = out.nsfw_content_detected[0] if out.nsfw_content_detected is not None else None
    return np.asarray((out.images[0] * 255).round().astype(np.uint8)), nsfw


@pytest.fixture(scope="module")
def checked_model(work_dir: Path, tiny_model: Callable[[str], Path]) -> Path:
    """The tiny SD model with a checker calibrated on its own outputs, so both verdicts occur."""
    model = work_dir / "models" / "tiny-sd-checked"
    if not model.exists():
        shutil.copytree(tiny_model("sd"), model)
        plain = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        plain.set_progress_bar_config(disable=True)
        build_tiny_safety_checker(model, calibration=[_images(plain, seed)[0] for seed in SEEDS])
    return model


@pytest.fixture(scope="module")
def checked_service(work_dir: Path, checked_model: Path) -> Iterator[RunningService]:
    repo = export_repository(str(checked_model), work_dir / "repositories" / "sd-checked")
    config = TritonLaunchConfig(model_repository=repo, state_dir=work_dir / "state-checked")
    with BundledTriton(config) as triton:
        settings = Settings(model_id=str(checked_model), triton_url=triton.http_url, model_repository=repo)
        with running_service(settings) as running:
            yield running


def test_nsfw_flags_match_diffusers_and_images_are_returned_as_generated(
    checked_model: Path, checked_service: RunningService
) -> None:
    checked = diffusers.StableDiffusionPipeline.from_pretrained(checked_model)
    plain = diffusers.StableDiffusionPipeline.from_pretrained(checked_model, safety_checker=None)
    for pipe in (checked, plain):
        pipe.set_progress_bar_config(disable=True)
    flags = []
    for seed in SEEDS:
        (image,) = generate(checked_service.url, **BODY, seed=seed)
        _, expected_flag = _images(checked, seed)
        as_generated, _ = _images(plain, seed)
        assert image["nsfw"] is expected_flag, f"seed {seed}"
        assert_close(decode(image["url"]), as_generated)  # not blacked out
        flags.append(image["nsfw"])
    assert any(flags) and not all(flags), flags


def test_safety_check_false_skips_the_checker(checked_service: RunningService) -> None:
    url = checked_service.url
    before = metric(url, "t2i_stage_latency_seconds_count", '{stage="safety_check"}')
    images = generate(url, **BODY, seed=SEEDS[0], num_images_per_prompt=2, safety_check=False)
    assert [i["nsfw"] for i in images] == [False, False]
    assert metric(url, "t2i_stage_latency_seconds_count", '{stage="safety_check"}') == before
    generate(url, **BODY, seed=SEEDS[0], num_images_per_prompt=2)
    assert metric(url, "t2i_stage_latency_seconds_count", '{stage="safety_check"}') == before + 1
