"""The Stable Diffusion safety checker as a Triton model: CLIP pixel values in, one NSFW flag per image out.

diffusers' ``StableDiffusionSafetyChecker`` embeds a CLIP-preprocessed image with a CLIP vision
tower, takes its cosine similarity to 17 concept embeddings and 3 "special care" embeddings, and flags
the image when any concept score ``round(cos - threshold + adjustment, 3)`` is positive, where
``adjustment`` is 0.01 when any special-care score ``round(cos - threshold, 3)`` is positive.
:class:`SafetyCheckerModule` computes exactly that (``forward``'s rounding included, which its
``forward_onnx`` leaves out) as one graph with a float32 flag per image, so it exports to ONNX like the
other components.  The image blackening of the diffusers checker is not part of it: the service
returns images as they are and only reports the flag.

The preprocessing (``CLIPImageProcessor``: resize, centre crop, normalise) runs on the service; its
``preprocessor_config.json`` is copied into the repository's model directory
(:data:`FEATURE_EXTRACTOR_DIR` under ``<repository>/safety_checker/``) so the service builds the same
processor from the repository alone.

A checker folder is either a diffusers model folder with ``safety_checker/`` (and usually
``feature_extractor/``) subfolders, or a folder that is itself the checker (``config.json`` of a
``StableDiffusionSafetyChecker``, as ``CompVis/stable-diffusion-safety-checker`` is laid out, with
``preprocessor_config.json`` beside it or in a sibling ``feature_extractor/``).

:func:`build_tiny_safety_checker` writes a tiny random-weight checker for tests, with thresholds
calibrated so that some images are flagged and others are not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from export.contract.specs import (
    CLIP_PREPROCESSOR_CONFIG,
    PREPROCESSOR_CONFIG,
    SAFETY_CHECKER,
    ModelSpec,
    safety_checker_spec,
)
from export.models.modules import Component, transformers_model
from export.models.source import ModelSourceError, read_json_object
from export.models.weights import WeightChoice

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FEATURE_EXTRACTOR_DIR",
    "PREPROCESSOR_CONFIG",
    "SAFETY_CHECKER",
    "SafetyCheckerModule",
    "SafetyCheckerSource",
    "build_tiny_safety_checker",
    "calibration_images",
    "model_safety_checker",
    "safety_checker_spec",
    "safety_component",
]

logger = logging.getLogger(__name__)

SAFETY_CHECKER_SUBFOLDER: Final = "safety_checker"
FEATURE_EXTRACTOR_SUBFOLDER: Final = "feature_extractor"
# Inside ``<repository>/safety_checker/``: the feature extractor's preprocessor_config.json, so that
# ``CLIPImageProcessor.from_pretrained(<repository>/safety_checker/feature_extractor)`` works.
FEATURE_EXTRACTOR_DIR: Final = "feature_extractor"
CHECKER_CLASS: Final = "StableDiffusionSafetyChecker"

# diffusers' StableDiffusionSafetyChecker.forward: the concept threshold drops by this much once any
# special-care concept matches, and scores are rounded to this many decimals before the "> 0" test.
SPECIAL_CARE_ADJUSTMENT: Final = 0.01
SCORE_DECIMALS: Final = 3


def _cosine_similarity(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    """diffusers' ``cosine_distance`` (which is a similarity): [B, D] x [C, D] -> [B, C]."""
    return torch.mm(nn.functional.normalize(image_embeds), nn.functional.normalize(concept_embeds).t())


def _positive_after_rounding(scores: torch.Tensor) -> torch.Tensor:
    """``round(score, 3) > 0`` per element, as Python's ``round`` on numpy floats does it (half to even)."""
    scale = float(10**SCORE_DECIMALS)
    return torch.round(scores * scale) > 0


class SafetyCheckerModule(nn.Module):
    """``pixel_values`` float32 [B, 3, S, S] (CLIP-preprocessed) -> ``has_nsfw`` float32 [B], 1.0 or 0.0.

    The flag equals ``has_nsfw_concepts`` of ``StableDiffusionSafetyChecker.forward`` on the same input
    (what diffusers' pipelines report).  The arithmetic runs in float32 where diffusers subtracts the
    thresholds in float64, so the two can only differ for a score within ~1e-7 of a rounding boundary.
    """

    def __init__(self, checker: nn.Module) -> None:
        super().__init__()
        self.checker = checker

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        checker: Any = self.checker
        pooled = checker.vision_model(pixel_values)[1]
        image_embeds = checker.visual_projection(pooled)
        special = _cosine_similarity(image_embeds, checker.special_care_embeds)
        concepts = _cosine_similarity(image_embeds, checker.concept_embeds)

        special_care = _positive_after_rounding(special - checker.special_care_embeds_weights).any(dim=1)
        adjustment = special_care.to(concepts.dtype) * SPECIAL_CARE_ADJUSTMENT
        concept_scores = concepts - checker.concept_embeds_weights + adjustment.unsqueeze(1)
        has_nsfw = _positive_after_rounding(concept_scores).any(dim=1)
        return has_nsfw.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Locating a checker and turning it into a Triton component
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetyCheckerSource:
    """Where a checker's files are: ``root / checker`` holds its ``config.json`` and weights.

    ``subfolders`` (relative to ``root``) are everything the exported model is built from, for the
    repository's fingerprint.  ``preprocessor`` is the feature extractor's ``preprocessor_config.json``,
    or None for the standard CLIP preprocessing.
    """

    root: Path
    checker: str
    preprocessor: Path | None

    @classmethod
    def find(cls, path: Path) -> SafetyCheckerSource:
        """The checker in ``path``: a diffusers folder with ``safety_checker/``, or the checker itself."""
        path = Path(path).expanduser().resolve()
        if (path / SAFETY_CHECKER_SUBFOLDER / "config.json").is_file():
            root, checker = path, SAFETY_CHECKER_SUBFOLDER
            candidates = [path / FEATURE_EXTRACTOR_SUBFOLDER / PREPROCESSOR_CONFIG]
        elif (path / "config.json").is_file():
            root, checker = path.parent, path.name
            candidates = [
                path / PREPROCESSOR_CONFIG,
                root / FEATURE_EXTRACTOR_SUBFOLDER / PREPROCESSOR_CONFIG,
            ]
        else:
            raise ModelSourceError(
                f"{path} holds no safety checker: "
                f"neither {SAFETY_CHECKER_SUBFOLDER}/config.json nor config.json"
            )
        source = cls(root, checker, next((c for c in candidates if c.is_file()), None))
        architectures = source.config().get("architectures") or []
        if CHECKER_CLASS not in architectures:
            raise ModelSourceError(
                f"{source.path}/config.json is not a {CHECKER_CLASS} (architectures: {architectures})"
            )
        if source.preprocessor is None:
            logger.warning(
                "%s: no %s found beside the safety checker; using the standard CLIP preprocessing",
                source.path,
                PREPROCESSOR_CONFIG,
            )
        return source

    @property
    def path(self) -> Path:
        return self.root / self.checker

    @property
    def subfolders(self) -> tuple[str, ...]:
        subs = [self.checker]
        if self.preprocessor is not None and not self.preprocessor.is_relative_to(self.path):
            subs.append(str(self.preprocessor.parent.relative_to(self.root)))
        return tuple(subs)

    def config(self) -> dict[str, Any]:
        return read_json_object(self.path / "config.json")

    def preprocessor_config(self) -> dict[str, Any]:
        if self.preprocessor is None:
            return dict(CLIP_PREPROCESSOR_CONFIG)
        return read_json_object(self.preprocessor)

    def image_size(self) -> int:
        return int(self.config().get("vision_config", {}).get("image_size", 224))

    def spec(self) -> ModelSpec:
        size = self.image_size()
        crop = self.preprocessor_config().get("crop_size", {})
        crop_sides = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        if crop_sides != (size, size):
            raise ModelSourceError(
                f"{self.path}: the feature extractor crops to {crop_sides}, the checker expects {size}x{size}"
            )
        return safety_checker_spec(image_size=size)

    def load(self, dtype: torch.dtype, weights: WeightChoice) -> SafetyCheckerModule:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = transformers_model(StableDiffusionSafetyChecker, self.root, self.checker, dtype, weights)
        return SafetyCheckerModule(checker.to(dtype))

    def component(self) -> Component:
        return Component(
            spec=self.spec(),
            subfolders=self.subfolders,
            loader=self.load,
            trace_sizes={"batch": 2},
            root=self.root,
            library="transformers",
        )

    def write_feature_extractor(self, model_dir: Path) -> Path:
        """Write the preprocessor config to ``model_dir/feature_extractor/``; returns that folder."""
        target = model_dir / FEATURE_EXTRACTOR_DIR
        target.mkdir(parents=True, exist_ok=True)
        (target / PREPROCESSOR_CONFIG).write_text(json.dumps(self.preprocessor_config(), indent=2) + "\n")
        return target


def safety_component(path: Path) -> Component:
    """The ``safety_checker`` Triton model of the checker in ``path`` (see ``SafetyCheckerSource.find``)."""
    return SafetyCheckerSource.find(path).component()


def model_safety_checker(model_dir: Path) -> SafetyCheckerSource | None:
    """The diffusers model's own checker when its ``model_index.json`` lists one, else None."""
    index = read_json_object(model_dir / "model_index.json")
    entry = index.get(SAFETY_CHECKER_SUBFOLDER)
    if not isinstance(entry, list) or not any(entry):
        return None
    if not (model_dir / SAFETY_CHECKER_SUBFOLDER).is_dir():
        raise ModelSourceError(
            f"{model_dir}: model_index.json lists a safety checker but {SAFETY_CHECKER_SUBFOLDER}/ is missing"
        )
    return SafetyCheckerSource.find(model_dir)


# --------------------------------------------------------------------------------------------------
# The tiny checker for tests
# --------------------------------------------------------------------------------------------------

TINY_SEED: Final = 4
_TINY_TOWER: Final[dict[str, Any]] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
_TINY_VISION: Final[dict[str, Any]] = {**_TINY_TOWER, "image_size": 224, "patch_size": 32}
_TINY_TEXT: Final[dict[str, Any]] = {**_TINY_TOWER, "max_position_embeddings": 77}
_CALIBRATION_IMAGES: Final = 32
# Fraction of calibration images whose special-care score is positive, per special-care concept.
_SPECIAL_CARE_RATE: Final = 0.25


def calibration_images(count: int, seed: int, size: int = 64) -> list[np.ndarray]:
    """``count`` random uint8 RGB images [size, size, 3]: a random colour per image plus noise.

    Like the tiny models' outputs, and different enough from each other that the tiny checker's
    flags split: the same generator calibrates the tiny checker (seed 0) and feeds tests (other seeds).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.uniform(0, 1, size=3)
        pixels = np.clip(base + 0.2 * rng.standard_normal((size, size, 3)), 0, 1)
        images.append((pixels * 255).round().astype(np.uint8))
    return images


def build_tiny_safety_checker(out_dir: Path, *, calibration: Sequence[np.ndarray] | None = None) -> Path:
    """Write a tiny random-weight checker as ``out_dir/safety_checker`` + ``out_dir/feature_extractor``.

    The checker is a ``StableDiffusionSafetyChecker`` on a tiny CLIP (32 wide, 2 layers, 224 pixels in
    32-pixel patches) with seeded random concept embeddings; its thresholds are calibrated on the
    ``calibration`` images (uint8 RGB [H, W, 3]; default: 32 :func:`calibration_images`, seed 0) so
    that about half of them are flagged and a quarter trigger each special-care concept.  Images much
    unlike the calibration set may all fall on one side: the tiny SD model's outputs, which are all
    alike, are not flagged by the default calibration; calibrate on some of them to get both outcomes.
    The feature extractor is the standard CLIP preprocessing.
    When ``out_dir`` is a diffusers model folder, its ``model_index.json`` is updated to list both,
    so ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads the checker.  Deterministic: the same
    files on every call; the caller's torch RNG state is kept.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = CLIPImageProcessorPil(**_processor_kwargs())
    config = CLIPConfig(text_config=_TINY_TEXT, vision_config=_TINY_VISION, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        checker = StableDiffusionSafetyChecker(config).eval()
        with torch.no_grad():
            checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
            checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
    if calibration is None:
        calibration = calibration_images(_CALIBRATION_IMAGES, seed=0)
    _calibrate(checker, processor, calibration)

    tmp = out_dir / f".safety-checker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        checker.save_pretrained(tmp / SAFETY_CHECKER_SUBFOLDER, safe_serialization=True)
        processor.save_pretrained(tmp / FEATURE_EXTRACTOR_SUBFOLDER)
        preprocessor = tmp / FEATURE_EXTRACTOR_SUBFOLDER / PREPROCESSOR_CONFIG
        saved = json.loads(preprocessor.read_text())
        # The class diffusers' pipelines name in model_index.json (the PIL variant loads the same file).
        saved["image_processor_type"] = "CLIPImageProcessor"
        preprocessor.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        for sub in (SAFETY_CHECKER_SUBFOLDER, FEATURE_EXTRACTOR_SUBFOLDER):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
            os.replace(tmp / sub, out_dir / sub)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _register_in_model_index(out_dir)
    logger.info("tiny safety checker written to %s", out_dir)
    return out_dir


def _processor_kwargs() -> dict[str, Any]:
    return {k: v for k, v in CLIP_PREPROCESSOR_CONFIG.items() if k != "image_processor_type"}


@torch.no_grad()
def _calibrate(checker: Any, processor: Any, calibration: Sequence[np.ndarray]) -> None:
    """Set the thresholds from the similarities of the ``calibration`` images.

    Special care: each threshold at the (1 - rate) quantile of its similarities.  Concepts: each
    threshold at its median plus one shared offset, the median over images of the largest margin, so
    that about half of the images have some concept above its threshold.
    """
    from PIL import Image

    if len(calibration) < 2:
        raise ValueError("calibrating the tiny safety checker needs at least 2 images")
    images = [Image.fromarray(a) for a in calibration]
    pixel_values = processor(images, return_tensors="pt").pixel_values
    embeds = checker.visual_projection(checker.vision_model(pixel_values)[1])
    special = _cosine_similarity(embeds, checker.special_care_embeds)
    concepts = _cosine_similarity(embeds, checker.concept_embeds)
    checker.special_care_embeds_weights.copy_(torch.quantile(special, 1 - _SPECIAL_CARE_RATE, dim=0))
    medians = concepts.median(dim=0).values
    offset = (concepts - medians).max(dim=1).values.median()
    checker.concept_embeds_weights.copy_(medians + offset)


def _register_in_model_index(model_dir: Path) -> None:
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    index[SAFETY_CHECKER_SUBFOLDER] = ["stable_diffusion", CHECKER_CLASS]
    index[FEATURE_EXTRACTOR_SUBFOLDER] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
