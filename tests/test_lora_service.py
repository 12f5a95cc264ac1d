"""LoRA variants through the service: images equal diffusers' LoRA pipeline; built once; LRU; errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.settings import Settings
from server.triton.launcher import BundledTriton
from tests.support.images import assert_close, decode, generate
from tests.support.lora import BODY, LORA_CASES, post, reference
from tests.support.service import metric, running_service

CASES = LORA_CASES


@pytest.fixture(scope="module")
def lora_service(
    service: Callable[..., str], repository: Callable[[str], Path], lora_dir: Path
) -> Callable[[str], str]:
    def get(family: str) -> str:
        return service(family, model_repository=repository(family), lora_dir=lora_dir, lora_hub=False)

    return get


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_one_and_two_loras_match_diffusers(
    family: str,
    fmt: str,
    lora_service: Callable[[str], str],
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
) -> None:
    url = lora_service(family)
    a, b = lora_dir / f"{family}-{fmt}-a", lora_dir / f"{family}-{fmt}-b"
    # by name under LORA_DIR (a folder), and by the file's name in it
    b_file = next(b.glob("*.safetensors")).relative_to(lora_dir).with_suffix("")
    for request, paths in (
        ({f"{family}-{fmt}-a": 0.8}, {str(a): 0.8}),
        ({f"{family}-{fmt}-a": 0.5, str(b_file): 1.2}, {str(a): 0.5, str(b): 1.2}),
    ):
        (image,) = generate(url, **BODY, loras=_json(request), seed=21)
        assert_close(decode(image["url"]), reference(tiny_model(family), paths, seed=21))
    # the LoRA changes the image: not the base model's
    (base,) = generate(url, **BODY, seed=21)
    assert np.abs(decode(base["url"]).astype(int) - decode(image["url"]).astype(int)).max() > 2


def test_concurrent_first_requests_build_once_and_a_restart_reuses_the_variant(
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
) -> None:
    settings = Settings(
        model_id=str(tiny_model("sd")),
        triton_url=triton("sd").http_url,
        model_repository=repository("sd"),
        lora_dir=lora_dir,
        lora_hub=False,
    )
    loras = _json({"sd-diffusers-c": 0.7, "sd-kohya-c": 0.3})
    with running_service(settings) as running:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=running.url, timeout=300) as client:
                body = {**BODY, "loras": loras, "seed": 5}
                return list(
                    await asyncio.gather(*(client.post("/text-to-image", json=body) for _ in range(8)))
                )

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 8
        urls = {r.json()["images"][0]["url"] for r in responses}
        assert len(urls) == 1
        assert metric(running.url, "t2i_lora_variant_builds_total") == 1
        assert metric(running.url, "t2i_lora_variant_build_seconds_count") == 1
        assert post(running.url, loras, seed=5).json()["images"][0]["url"] in urls
        assert metric(running.url, "t2i_lora_variant_builds_total") == 1
    with running_service(settings) as restarted:
        assert post(restarted.url, loras, seed=5).json()["images"][0]["url"] in urls
        assert metric(restarted.url, "t2i_lora_variant_builds_total") == 0


def test_lru_bound_keeps_the_most_recently_used_variants(
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
) -> None:
    """python-onnx: variants are served by the base models (no model per variant in Triton); the
    service keeps at most MAX_LORA_VARIANTS resident and finds an evicted one on disk again."""
    server = triton("sd")
    settings = Settings(
        model_id=str(tiny_model("sd")),
        triton_url=server.http_url,
        model_repository=repository("sd"),
        lora_dir=lora_dir,
        lora_hub=False,
        max_lora_variants=1,
    )
    with (
        running_service(settings) as running,
        grpcclient.InferenceServerClient(server.grpc_url) as triton_client,
    ):
        variants = running.app.state.supervisor.registry.default.variants
        models_before = _models(triton_client)
        first_image = post(running.url, _json({"sd-diffusers-d": 1.0}), seed=3).json()["images"][0]["url"]
        (first,) = variants.loaded()
        assert first.denoiser == "unet" and first.parameters["unet"] == {"lora_variant": first.key}
        assert post(running.url, _json({"sd-kohya-d": 1.0})).status_code == 200
        (second,) = variants.loaded()
        assert second.key != first.key
        assert metric(running.url, "t2i_lora_variants_loaded") == 1
        builds = metric(running.url, "t2i_lora_variant_builds_total")
        again = post(running.url, _json({"sd-diffusers-d": 1.0}), seed=3).json()["images"][0]["url"]
        assert again == first_image  # the model reopened its session from the override file
        assert metric(running.url, "t2i_lora_variant_builds_total") == builds  # found on disk
        models_after = _models(triton_client)
        assert models_after == models_before  # no model (no process) per variant
        overrides = sorted((repository("sd") / "unet" / "variants").glob("*.safetensors"))
        assert {f.stem for f in overrides} >= {first.key, second.key}


@pytest.mark.parametrize(
    ("loras", "msg"),
    [
        ('{"nope/missing": 1.0}', "LoRa repository 'nope/missing' not found"),
        ('{"not-in-lora-dir": 1.0}', "LoRa repository 'not-in-lora-dir' not found"),
        ('{"sdxl-diffusers-b": 1.0}', "LoRa incompatible with base model: "),
        ('{"sdxl-kohya-a": 1.0}', "LoRa incompatible with base model: "),
        ('{"x": -1}', "All strengths must be numbers greater than or equal to 0.0."),
        ('{"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}', "Too many LoRas provided. Maximum is 4."),
        ("not json", "Unable to parse 'not json' as JSON."),
    ],
)
def test_lora_errors_are_400_and_the_service_keeps_serving(
    loras: str, msg: str, lora_service: Callable[[str], str]
) -> None:
    url = lora_service("sd")
    response = post(url, loras)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["msg"].startswith(msg)
    assert post(url, "").status_code == 200


def _json(loras: dict[str, float]) -> str:
    import json

    return json.dumps(loras)


def _models(client: grpcclient.InferenceServerClient) -> set[str]:
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return {m["name"] for m in index if not m["name"].startswith(".")}
