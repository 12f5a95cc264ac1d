"""The safety checker as a Triton model: the torch wrapper, its ONNX graph, the repository, real Triton."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from google.protobuf import text_format
from PIL import Image
from torch.nn.functional import normalize
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from tritonclient.grpc import model_config_pb2 as mc

from export.contract.specs import MANIFEST_FILE
from export.models.safety import (
    FEATURE_EXTRACTOR_DIR,
    PREPROCESSOR_CONFIG,
    SAFETY_CHECKER,
    SafetyCheckerModule,
    SafetyCheckerSource,
    build_tiny_safety_checker,
    calibration_images,
    model_safety_checker,
    safety_component,
)
from export.models.source import ModelSourceError
from export.toolchain.cli import main as export_main
from export.toolchain.onnx_export import check_onnx, export_onnx
from export.toolchain.repository import export_repository
from server.pipeline.safety import SafetyChecker
from server.triton.launcher import BundledTriton, TritonLaunchConfig
from tests.support.service import needs_triton


@pytest.fixture(scope="module")
def checker_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    """A copy of the tiny SD model with the tiny safety checker and feature extractor added."""
    model = tmp_path_factory.mktemp("safety") / "tiny-sd-checker"
    shutil.copytree(tiny_model("sd"), model)
    return build_tiny_safety_checker(model)


@pytest.fixture(scope="module")
def diffusers_checker(checker_model: Path) -> StableDiffusionSafetyChecker:
    return StableDiffusionSafetyChecker.from_pretrained(checker_model, subfolder="safety_checker").eval()


@pytest.fixture(scope="module")
def pixel_values(checker_model: Path) -> torch.Tensor:
    """8 preprocessed random images (the checker model's max batch), as the pipeline hands them over."""
    processor = CLIPImageProcessorPil.from_pretrained(checker_model / "feature_extractor")
    images = [Image.fromarray(a) for a in calibration_images(8, seed=1)]
    return processor(images, return_tensors="pt").pixel_values  # type: ignore[no-any-return]


def diffusers_flags(checker: StableDiffusionSafetyChecker, pixel_values: torch.Tensor) -> list[bool]:
    """``has_nsfw_concepts`` of diffusers' own checker (its ``forward``, as the pipelines call it)."""
    images = np.zeros((len(pixel_values), 1), dtype=np.float32)
    with torch.no_grad():
        _, flags = checker(clip_input=pixel_values, images=images)
    return [bool(f) for f in flags]


@pytest.fixture(scope="module")
def expected(diffusers_checker: StableDiffusionSafetyChecker, pixel_values: torch.Tensor) -> list[bool]:
    flags = diffusers_flags(diffusers_checker, pixel_values)
    assert any(flags) and not all(flags), f"the tiny checker should flag some images, not all: {flags}"
    return flags


@pytest.fixture(scope="module")
def checker_repository(
    tmp_path_factory: pytest.TempPathFactory, checker_model: Path, repository: Callable[[str], Path]
) -> Path:
    """The session's tiny SD repository, copied and re-exported from the model with the checker.

    The text encoder, UNet and VAE come from the cache (same files in another folder); only the
    checker is exported.
    """
    repo = tmp_path_factory.mktemp("safety-repo") / "repo"
    shutil.copytree(repository("sd"), repo)
    return export_repository(str(checker_model), repo)


def to_flags(values: np.ndarray) -> list[bool]:
    return [bool(v) for v in np.asarray(values).reshape(-1) > 0.5]


def test_wrapper_matches_the_diffusers_checker(
    checker_model: Path, pixel_values: torch.Tensor, expected: list[bool]
) -> None:
    module = safety_component(checker_model).load().eval()
    with torch.no_grad():
        has_nsfw = module(pixel_values)
    assert has_nsfw.dtype == torch.float32 and has_nsfw.shape == (len(pixel_values),)
    assert set(has_nsfw.tolist()) == {0.0, 1.0}
    assert to_flags(has_nsfw.numpy()) == expected


def test_special_care_adjustment_and_score_rounding_follow_diffusers(
    diffusers_checker: StableDiffusionSafetyChecker, pixel_values: torch.Tensor
) -> None:
    """Thresholds set around one image's own similarities hit the 0.01 adjustment and the rounding."""
    checker = copy.deepcopy(diffusers_checker)  # its thresholds are changed below
    module = SafetyCheckerModule(checker).eval()
    image = pixel_values[:1]
    with torch.no_grad():
        embeds = normalize(checker.visual_projection(checker.vision_model(image)[1]))
        special = embeds @ normalize(checker.special_care_embeds).T
        concepts = embeds @ normalize(checker.concept_embeds).T

    def flags(concept_margin: float, special_margin: float) -> tuple[bool, bool]:
        """(wrapper, diffusers) when every score is ``concept_margin`` / ``special_margin``."""
        with torch.no_grad():
            checker.concept_embeds_weights.copy_(concepts[0] - concept_margin)
            checker.special_care_embeds_weights.copy_(special[0] - special_margin)
            ours = to_flags(module(image).numpy())[0]
        return ours, diffusers_flags(checker, image)[0]

    assert flags(-0.005, -0.1) == (False, False)  # below the threshold, no special care
    assert flags(-0.005, 0.1) == (True, True)  # special care lowers the threshold by 0.01
    assert flags(0.002, -0.1) == (True, True)
    assert flags(0.0003, -0.1) == (False, False)  # rounds to 0.000: not flagged
    with torch.no_grad():  # diffusers' forward_onnx does not round, so it disagrees with forward here
        assert checker.forward_onnx(image, torch.zeros(1, 1))[1].tolist() == [True]
    assert flags(-0.005, 0.0003) == (False, False)  # a special score rounding to 0 adds no adjustment


def test_onnx_graph_matches_torch_and_diffusers(
    tmp_path: Path, checker_model: Path, pixel_values: torch.Tensor, expected: list[bool]
) -> None:
    import onnxruntime as ort

    component = safety_component(checker_model)
    assert component.spec.name == SAFETY_CHECKER
    module = component.load().eval()
    path = tmp_path / "model.onnx"
    export_onnx(module, component.spec, component.trace_sizes, path)
    results = check_onnx(module, component.spec, path)
    assert [r.sizes["batch"] for r in results] == [1, 3] and all(r.ok for r in results)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (has_nsfw,) = session.run(["has_nsfw"], {"pixel_values": pixel_values.numpy()})
    assert has_nsfw.dtype == np.float32 and has_nsfw.shape == (len(pixel_values),)
    assert to_flags(has_nsfw) == expected


def test_tiny_checker_is_deterministic_and_calibrates_on_given_images(tmp_path: Path) -> None:
    # Alike images (grey-green noise, like the tiny SD model's outputs): both outcomes once calibrated.
    rng = np.random.default_rng(3)
    images = [
        (np.clip(rng.normal([0.43, 0.55, 0.43], 0.16, size=(64, 64, 3)), 0, 1) * 255).round().astype(np.uint8)
        for _ in range(8)
    ]
    first = build_tiny_safety_checker(tmp_path / "a", calibration=images)
    second = build_tiny_safety_checker(tmp_path / "b", calibration=images)
    for sub in ("safety_checker", "feature_extractor"):
        files = sorted(p.relative_to(first) for p in (first / sub).rglob("*") if p.is_file())
        assert files and all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    checker = StableDiffusionSafetyChecker.from_pretrained(first, subfolder="safety_checker").eval()
    processor = CLIPImageProcessorPil.from_pretrained(first / "feature_extractor")
    pixels = processor([Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    flags = diffusers_flags(checker, pixels)
    assert any(flags) and not all(flags), flags


def test_finding_the_checker(tmp_path: Path, checker_model: Path, tiny_model: Callable[[str], Path]) -> None:
    assert model_safety_checker(tiny_model("sdxl")) is None  # SDXL pipelines have no checker
    own = model_safety_checker(checker_model)
    assert own is not None and own.path == checker_model / "safety_checker"
    assert own.subfolders == ("safety_checker", "feature_extractor")
    # The checker folder itself finds the sibling feature extractor: the same sources.
    assert SafetyCheckerSource.find(checker_model / "safety_checker") == own

    bare = tmp_path / "checker"
    shutil.copytree(checker_model / "safety_checker", bare)
    source = SafetyCheckerSource.find(bare)
    assert source.preprocessor is None and source.subfolders == ("checker",)
    assert source.preprocessor_config() == own.preprocessor_config()  # the standard CLIP preprocessing
    shutil.copy(checker_model / "feature_extractor" / PREPROCESSOR_CONFIG, bare)
    assert SafetyCheckerSource.find(bare).preprocessor == bare / PREPROCESSOR_CONFIG

    with pytest.raises(ModelSourceError, match="holds no safety checker"):
        SafetyCheckerSource.find(tiny_model("sdxl"))
    with pytest.raises(ModelSourceError, match="is not a StableDiffusionSafetyChecker"):
        SafetyCheckerSource.find(tiny_model("sd") / "vae")


def test_repository_has_the_checker_model(checker_repository: Path, checker_model: Path) -> None:
    manifest = json.loads((checker_repository / MANIFEST_FILE).read_text())
    assert manifest["models"] == ["text_encoder", "unet", "vae_decoder", SAFETY_CHECKER]
    model_dir = checker_repository / SAFETY_CHECKER
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert not config.name  # Triton names it after its folder
    assert config.backend == "python" and config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    (pixel_input,) = config.input
    assert pixel_input.name == "pixel_values" and pixel_input.data_type == mc.TYPE_FP32
    assert list(pixel_input.dims) == [3, 224, 224]
    (output,) = config.output
    assert output.name == "has_nsfw" and output.data_type == mc.TYPE_FP32
    assert list(output.dims) == [1] and output.HasField("reshape") and list(output.reshape.shape) == []
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "1" / "model.py").is_file()

    # The service builds the same preprocessing from the repository alone.
    copied = model_dir / FEATURE_EXTRACTOR_DIR
    assert json.loads((copied / PREPROCESSOR_CONFIG).read_text()) == json.loads(
        (checker_model / "feature_extractor" / PREPROCESSOR_CONFIG).read_text()
    )
    image = calibration_images(1, seed=7)[0]
    ours = SafetyChecker.from_folders(None, copied).preprocessing([image])  # type: ignore[arg-type]
    theirs = CLIPImageProcessorPil.from_pretrained(checker_model / "feature_extractor")(
        Image.fromarray(image), return_tensors="np"
    ).pixel_values
    np.testing.assert_array_equal(ours, theirs)


SD15_FEATURE_EXTRACTOR = {  # Stable Diffusion 1.5's own file: sizes as ints, the old class name
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


@pytest.mark.parametrize(
    "config",
    [
        {},
        SD15_FEATURE_EXTRACTOR,
        {"size": {"shortest_edge": 112}, "crop_size": {"height": 224, "width": 200}},  # zero-padded crop
        {"size": {"height": 200, "width": 240}, "resample": 2, "do_center_crop": False},
        {"do_normalize": False, "rescale_factor": 0.5, "resample": 0},
        {"do_rescale": False, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]},
        {"do_resize": False, "crop_size": {"height": 224, "width": 224}},
    ],
    ids=["clip", "sd15", "padded-crop", "fixed-size", "no-normalize", "no-rescale", "no-resize"],
)
def test_the_services_preprocessing_is_transformers_value_for_value(
    config: dict[str, object], tmp_path: Path
) -> None:
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps(config))
    ours = SafetyChecker.from_folders(None, tmp_path / "none", tmp_path).preprocessing  # type: ignore[arg-type]
    theirs = CLIPImageProcessorPil.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    # Square, landscape and portrait, smaller and larger than the crop, odd sides.
    for height, width in [(256, 256), (256, 384), (768, 512), (64, 96), (9, 13), (225, 224), (1024, 1024)]:
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
        expected = theirs([Image.fromarray(i) for i in images], return_tensors="np").pixel_values
        got = ours(images)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected.astype(np.float32), err_msg=f"{height}x{width}")


def test_preprocessing_the_service_cannot_reproduce_is_refused(tmp_path: Path) -> None:
    (tmp_path / PREPROCESSOR_CONFIG).write_text(
        json.dumps({"size": {"shortest_edge": 224, "longest_edge": 300}})
    )
    with pytest.raises(ValueError, match="unsupported size"):
        SafetyChecker.from_folders(None, tmp_path)  # type: ignore[arg-type]


def test_unchanged_checker_is_reused_and_the_cli_takes_a_checker_path(
    checker_repository: Path,
    checker_model: Path,
    tiny_model: Callable[[str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    repository = checker_repository
    onnx_files = {p: p.stat().st_mtime_ns for p in repository.glob("*/1/model.onnx")}
    with caplog.at_level(logging.INFO, logger="export.toolchain.repository"):
        export_repository(str(checker_model), repository)
        # The model without a checker of its own, with the checker folder given explicitly.
        args = [str(tiny_model("sd")), "--out", str(repository)]
        assert export_main([*args, "--safety-checker", str(checker_model / "safety_checker")]) == 0
    assert caplog.text.count("unchanged, reusing") == 8
    assert {p: p.stat().st_mtime_ns for p in repository.glob("*/1/model.onnx")} == onnx_files
    assert SAFETY_CHECKER in json.loads((repository / MANIFEST_FILE).read_text())["models"]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, checker_repository: Path) -> Iterator[BundledTriton]:
    """The bundled tritonserver serving only the repository's safety checker; always stopped."""
    config = TritonLaunchConfig(
        model_repository=checker_repository,
        state_dir=tmp_path_factory.mktemp("safety-triton"),
        explicit_model_control=True,
        load_models=(SAFETY_CHECKER,),
    )
    server = BundledTriton(config)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@needs_triton
def test_triton_runs_the_checker(
    triton: BundledTriton, pixel_values: torch.Tensor, expected: list[bool]
) -> None:
    import tritonclient.grpc as grpcclient

    def infer(batch: np.ndarray) -> np.ndarray:
        tensor = grpcclient.InferInput("pixel_values", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer(SAFETY_CHECKER, [tensor], outputs=[grpcclient.InferRequestedOutput("has_nsfw")])
        out = result.as_numpy("has_nsfw")
        assert out is not None
        return out

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert client.is_model_ready(SAFETY_CHECKER)
        batch = pixel_values.numpy()
        has_nsfw = infer(batch)
        assert has_nsfw.dtype == np.float32 and has_nsfw.shape == (len(batch), 1)
        assert to_flags(has_nsfw) == expected
        # Concurrent single-image requests, which the dynamic batcher may join: same flags.
        with ThreadPoolExecutor(4) as pool:
            singles = list(pool.map(infer, [batch[i : i + 1] for i in range(len(batch))]))
        assert [to_flags(s)[0] for s in singles] == expected
    finally:
        client.close()
