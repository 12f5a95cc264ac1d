"""The model the service serves, as its requests use it, and the steps that build it.

Two stages, each an immutable object the supervisor (``server/supervisor.py``) hands to the service:

- :class:`ModelDescription`, known once the model's configs, tokenizers and scheduler are loaded
  (before Triton serves): what the API's rules need, so a request is checked while the service loads;
- :class:`LoadedModel`, once Triton serves it and it has warmed up: the description, the LoRA variant
  manager, the pipeline and the safety checker.  A new one replaces it when the client changes (a
  restarted Triton) or the safety checker does.

The heavy serving code (torch, diffusers) is imported by :func:`load_model` in a worker thread, never
at module level, so the service listens at once.  Several models (``MODEL_IDS``) make
each of these part of one entry of the registry (``server/registry.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.contract import specs
from export.models.lora import ONNX_PREFIXES
from export.models.source import ModelSource, resolve_model
from server.engines import (
    RepositoryEngines,
    check_engine_host,
    read_repository,
    require_exported,
    running_hosts,
)
from server.metrics import ModelMetrics
from server.pipeline.request import GenerationRequest
from server.pipeline.rules import rule_for
from server.settings import ServedModel, Settings

if TYPE_CHECKING:  # loaded by load_model, beside Triton's start
    from server.pipeline.generate import InferenceClient, TextToImagePipeline
    from server.pipeline.model import DiffusionModel
    from server.pipeline.safety import SafetyChecker
    from server.triton.scoped import ModelClient
    from server.variants import VariantManager
    from server.variants.residency import ModelControl


@dataclass(frozen=True)
class ModelDescription:
    """What the API's rules need of the model, known before Triton serves it: its description
    (tokenizers, VAE scale, sizes) and the repository's TensorRT buckets (empty for python targets)."""

    model: DiffusionModel
    engines: RepositoryEngines


@dataclass(frozen=True)
class LoadedModel:
    """The model while it serves: what one request uses, from its rules to its safety check."""

    description: ModelDescription
    variants: VariantManager
    pipeline: TextToImagePipeline
    safety_checker: SafetyChecker | None

    @property
    def model(self) -> DiffusionModel:
        return self.description.model


def base_models(source: ModelSource) -> list[str]:
    """The Triton models every generation of this model calls."""
    return [source.denoiser, specs.VAE_DECODER, *source.text_encoders]


def lora_models(source: ModelSource) -> list[str]:
    """The base models a LoRA can change (the denoiser and the CLIP text encoders)."""
    return [m for m in (source.denoiser, *source.text_encoders) if m in ONNX_PREFIXES]


def open_repository(settings: Settings, served: ServedModel) -> tuple[ModelSource, RepositoryEngines]:
    """The model's folder (configs only) and the repository's engines, checked against this host."""
    path = resolve_model(served.model_id, weights=False, cache_dir=settings.model_dir)
    repository = served.repository.resolve()
    running = running_hosts()
    if not settings.triton_url:
        require_exported(repository, served.model_id, gpu=bool(running))
    engines = read_repository(repository)
    check_engine_host(engines, running, repository, served.model_id)
    return ModelSource(path), engines


def load_model(
    settings: Settings,
    served: ServedModel,
    source: ModelSource,
    client: Callable[[], ModelControl],
    metrics: ModelMetrics,
) -> tuple[DiffusionModel, VariantManager]:
    """The model's tokenizers and scheduler, and its LoRA variants (a worker thread).  The serving
    code is imported here, not at module level: torch and diffusers take seconds."""
    import torch

    from server.pipeline import flow, safety  # noqa: F401 - the pipeline's modules, loaded here
    from server.pipeline.model import DiffusionModel
    from server.variants.setup import variant_manager

    torch.set_num_threads(settings.torch_threads)  # a setting of the process, not the thread
    model = DiffusionModel(source, settings.scheduler, rule_for(served.model_id), served.repository)
    variants = variant_manager(
        settings, served.repository, source.text_encoders, client, metrics, source.denoiser
    )
    return model, variants


async def serving_pipeline(
    description: ModelDescription, client: InferenceClient, warmup: bool
) -> TextToImagePipeline:
    """The model's pipeline over ``client``, warmed up with one small generation when ``warmup``."""
    from server.pipeline.flow import pipeline_for  # loaded by load_model

    pipeline = pipeline_for(description.model, client)
    if warmup:
        await pipeline(warmup_request(description))
    return pipeline


async def find_safety_checker(
    settings: Settings,
    repository: Path,
    source: ModelSource,
    client: ModelClient,
    kept: SafetyChecker | None,
) -> SafetyChecker | None:
    """The checker when enabled and Triton serves one; ``kept`` while it uses the same client."""
    if settings.safety_checker == "off" or not await client.model_ready(specs.SAFETY_CHECKER):
        return None
    if kept is not None and kept.client is client:
        return kept
    from server.pipeline.safety import SafetyChecker  # loaded by load_model

    folders = (
        source.path / "feature_extractor",
        repository / specs.SAFETY_CHECKER / "feature_extractor",
    )
    return await asyncio.to_thread(SafetyChecker.from_folders, client, *folders)


def warmup_request(description: ModelDescription) -> GenerationRequest:
    """Smallest image the UNet takes (the smallest engine bucket on tensorrt), with guidance, so every
    model and code path runs once."""
    side = 8 * description.model.vae_scale_factor
    width, height = side, side
    if description.engines.resolutions:
        smallest = min(description.engines.resolutions, key=lambda r: r.width * r.height)
        width, height = smallest.width, smallest.height
    return GenerationRequest(
        prompt="warm-up",
        negative_prompt="",
        height=height,
        width=width,
        guidance_scale=7.5,
        num_inference_steps=2,
        num_images=1,
        seed=0,
    )
