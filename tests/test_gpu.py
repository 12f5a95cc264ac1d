"""The GPU path end to end: `make test-gpu` (pytest -m gpu) on a GPU host with TensorRT 10, or in the
Docker image (whose tritonserver has the TensorRT backend). Skipped elsewhere with the reason.

- engines for both tiny families, built with their built-in check against onnxruntime;
- the service on those engines (the image's tritonserver) against diffusers' own pipeline in fp16
  on the GPU, same seeds: IMAGE_TOLERANCE below;
- a LoRA variant made by refitting the base UNet engine against diffusers' load_lora_weights +
  fuse_lora (fp32): the fp16 tolerance of export/models/precision.py;
- out of GPU memory while serving: the contract's 500, then a 200 once memory is back.

fp16 image tolerance: the service and diffusers both run the tiny model in fp16 on the GPU, with
different kernels (TensorRT's fused ones, cuDNN's), so their noise predictions differ by fp16
rounding at every step; after 8 steps that is a few 8-bit levels on most pixels. Allowed: mean
|difference| <= 2/255 and 99% of the pixels within 8/255.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from export.contract import specs
from export.contract.engines import Resolution
from export.contract.specs import MANIFEST_FILE
from export.models.precision import FP16_TOLERANCE
from export.toolchain.onnx_export import example_inputs
from export.toolchain.options import RepositoryOptions
from export.toolchain.repository import export_repository
from export.toolchain.tensorrt import TIMING_CACHE_FILE, EngineRunner, current_host
from export.toolchain.tensorrt_plan import PLAN_FILE, EngineOptions
from server.settings import Settings
from tests.support.service import running_service


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: run `make test-gpu` on a GPU host from a checkout (docs/gpu.md)"
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"needs TensorRT 10 (the Docker image has it): {type(e).__name__}: {e}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

BUCKETS = (Resolution(128, 64), Resolution(64, 64))
STEPS = 8
IMAGE_MEAN_TOLERANCE = 2
IMAGE_P99_TOLERANCE = 8


@pytest.fixture(scope="session")
def engine_repository(work_dir: Path, tiny_model: Callable[[str], Path]) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            options = RepositoryOptions(
                target="tensorrt", engine=EngineOptions(resolutions=BUCKETS, max_batch=8)
            )
            built[family] = export_repository(str(tiny_model(family)), work_dir / "engines" / family, options)
        return built[family]

    return get


def _tritonserver() -> str:
    binary = shutil.which("tritonserver")
    if binary is None:
        pytest.skip("needs a tritonserver with the TensorRT backend on PATH (the Docker image's)")
    return binary


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_engines_build_for_both_families(family: str, engine_repository: Callable[[str], Path]) -> None:
    """The export built (and checked against onnxruntime at every profile's opt shape) each engine;
    the repository records the buckets and the host; a second export reuses everything."""
    import json

    repo = engine_repository(family)
    manifest = json.loads((repo / MANIFEST_FILE).read_text())
    assert manifest["target"] == "tensorrt"
    assert manifest["resolutions"] == [str(r) for r in BUCKETS]
    assert manifest["engine"] == current_host().as_dict()
    for name in manifest["models"]:
        assert (repo / name / "1" / PLAN_FILE).stat().st_size > 0
        record = json.loads((repo / name / ".export.json").read_text())
        assert record["engine"] == manifest["engine"]
    assert (repo / TIMING_CACHE_FILE).stat().st_size > 0
    again = {p: p.stat().st_mtime_ns for p in repo.rglob(PLAN_FILE)}
    export_repository(
        manifest["model"],
        repo,
        RepositoryOptions(target="tensorrt", engine=EngineOptions(resolutions=BUCKETS, max_batch=8)),
    )
    assert {p: p.stat().st_mtime_ns for p in repo.rglob(PLAN_FILE)} == again


def _decode(url: str) -> np.ndarray:
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def _diffusers_fp16(model_dir: Path, family: str, seed: int, **kwargs: Any) -> np.ndarray:
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None}
    pipe = cls.from_pretrained(model_dir, torch_dtype=torch.float16, **extra).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    return np.asarray((out * 255).round()).astype(np.int16)


@pytest.fixture(scope="session")
def engine_service(
    work_dir: Path, tiny_model: Callable[[str], Path], engine_repository: Callable[[str], Path]
) -> Iterator[Callable[[str], str]]:
    import contextlib

    stack = contextlib.ExitStack()
    urls: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in urls:
            settings = Settings(
                model_id=str(tiny_model(family)),
                model_repository=engine_repository(family),
                state_dir=work_dir / f"gpu-state-{family}",
                tritonserver=_tritonserver(),
            )
            urls[family] = stack.enter_context(running_service(settings, timeout_s=600)).url
        return urls[family]

    with stack:
        yield get


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_fp16_engines_match_diffusers_fp16(
    family: str, engine_service: Callable[[str], str], tiny_model: Callable[[str], Path]
) -> None:
    url = engine_service(family)
    for seed in (0, 42):
        body = {
            "prompt": "a photo of a cat",
            "width": 128,
            "height": 64,
            "guidance_scale": 7.5,
            "num_inference_steps": STEPS,
            "seed": seed,
            "safety_check": False,
        }
        response = httpx.post(f"{url}/text-to-image", json=body, timeout=300)
        assert response.status_code == 200, response.text
        got = _decode(response.json()["images"][0]["url"])
        expected = _diffusers_fp16(
            tiny_model(family),
            family,
            seed,
            prompt=body["prompt"],
            width=128,
            height=64,
            guidance_scale=7.5,
            num_inference_steps=STEPS,
        )
        diff = np.abs(got - expected)
        assert diff.mean() <= IMAGE_MEAN_TOLERANCE, f"mean |diff| {diff.mean():.2f}"
        assert np.percentile(diff, 99) <= IMAGE_P99_TOLERANCE, f"p99 |diff| {np.percentile(diff, 99)}"
    outside = httpx.post(f"{url}/text-to-image", json={**body, "width": 96, "height": 96}, timeout=60)
    assert outside.status_code == 400 and "128x64, 64x64" in outside.text


def test_refitted_lora_variant_matches_diffusers_lora(
    tmp_path: Path, tiny_model: Callable[[str], Path], engine_repository: Callable[[str], Path]
) -> None:
    import diffusers
    from safetensors.torch import save_file

    from export.fixtures.tiny_lora import build_tiny_lora
    from export.models.lora import load_lora, merge_deltas, onnx_state
    from export.models.modules import UNetModule
    from export.models.refit import refit_variant

    repo = engine_repository("sd")
    lora = build_tiny_lora("sd", tmp_path / "lora.safetensors", "diffusers", 3, model_dir=tiny_model("sd"))
    base = onnx_state(repo / specs.UNET / "1" / "model.onnx", "unet.")
    deltas = merge_deltas(base, [(load_lora(lora), 0.8)], "unet")
    key = "fedcba9876543210"
    overrides = repo / specs.UNET / "variants" / f"{key}.safetensors"
    overrides.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(overrides))
    variant_dir = refit_variant(repo, specs.UNET, key)
    assert variant_dir.name == f"unet__{key}"

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model("sd"), safety_checker=None)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=0.8)
    reference = UNetModule(pipe.unet, text_time=False).eval()
    from export.models.modules import components
    from export.models.source import ModelSource

    spec = next(c.spec for c in components(ModelSource(tiny_model("sd"))) if c.spec.name == specs.UNET)
    engine = EngineRunner((variant_dir / "1" / PLAN_FILE).read_bytes(), "unet variant")
    for profile, bucket in enumerate(BUCKETS):
        sizes = {"batch": 2, "height": bucket.height // 8, "width": bucket.width // 8}
        feeds = example_inputs(spec, sizes, seed=profile)
        (got,) = engine.run(profile, feeds, ["noise_pred"])
        with torch.no_grad():
            expected = reference(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
        allowed = FP16_TOLERANCE.allowed(float(np.abs(expected).max()))
        assert float(np.abs(got - expected).max()) <= allowed


def test_out_of_memory_at_a_variant_load_is_the_contract_500_then_serving_goes_on(
    work_dir: Path,
    tiny_model: Callable[[str], Path],
    engine_repository: Callable[[str], Path],
    lora_dir: Path,
) -> None:
    """Fill the GPU from this process, ask for a LoRA variant (a new Triton model to load), free it,
    ask again.

    Triton's TensorRT backend allocates each engine's execution contexts at load (its default STATIC
    strategy), so out of memory is a load failure ("unable to create TensorRT context: ..."), not a
    request failure: the variant's load fails, no idle variant is there to evict, and the answer is the
    contract's 500; once memory is free the same request loads the variant and answers 200."""
    import json

    settings = Settings(
        model_id=str(tiny_model("sd")),
        model_repository=engine_repository("sd"),
        state_dir=work_dir / "gpu-state-oom",
        tritonserver=_tritonserver(),
        lora_dir=lora_dir,
    )
    body = {
        "prompt": "a cat",
        "width": 128,
        "height": 64,
        "num_inference_steps": 2,
        "seed": 1,
        "safety_check": False,
        "loras": json.dumps({"sd-diffusers-b": 1.0}),
    }
    with running_service(settings, timeout_s=600) as service:
        url = service.url
        hog: list[torch.Tensor] = []
        try:
            while True:
                free, _ = torch.cuda.mem_get_info()
                if free < 64 << 20:
                    break
                hog.append(torch.empty(max(free - (32 << 20), 1 << 20), dtype=torch.uint8, device="cuda"))
            response = httpx.post(f"{url}/text-to-image", json=body, timeout=300)
        finally:
            hog.clear()
            torch.cuda.empty_cache()
        assert response.status_code == 500, response.text
        assert response.json() == {
            "detail": {"msg": "Out of memory error. Try reducing output image resolution."}
        }
        again = httpx.post(f"{url}/text-to-image", json=body, timeout=300)
        assert again.status_code == 200, again.text
