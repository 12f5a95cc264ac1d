"""The variant manager for a service's settings and model repository (its pieces, wired once)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from export.contract import specs
from export.models.refit import TensorRTUnavailable, refit_variant
from server.errors import InferenceFailed
from server.metrics import ModelMetrics
from server.settings import Settings
from server.variants.cache import DOWNLOADS_DIR, LORA_DIR, DiskCache
from server.variants.residency import ModelControl, ModelPerVariant, ParameterServing, Serving, VariantManager
from server.variants.sources import HubPolicy, LoraSources


def variant_manager(
    settings: Settings,
    repository: Path,
    text_encoders: tuple[str, ...],
    client: Callable[[], ModelControl],
    metrics: ModelMetrics,
    denoiser: str = specs.UNET,
) -> VariantManager:
    """Reads the disk cache (bringing it within LORA_CACHE_GB): call it off the event loop."""
    repository = repository.resolve()
    folders = [settings.lora_dir] if settings.lora_dir is not None else []
    folders += [Path(p) for p in settings.lora_extra_dirs.split(os.pathsep) if p]
    hub = HubPolicy(
        enabled=settings.lora_hub,
        timeout_s=settings.lora_hub_timeout_s,
        max_bytes=int(settings.lora_max_mb * 2**20),
        endpoint=settings.hf_endpoint,
    )
    downloads = repository / denoiser / LORA_DIR / DOWNLOADS_DIR
    cache = DiskCache(repository, downloads, (denoiser, *text_encoders), int(settings.lora_cache_gb * 2**30))
    cache.scan()
    return VariantManager(
        repository,
        text_encoders,
        LoraSources(tuple(folders), hub, downloads),
        cache,
        serving_for(repository, client, denoiser),
        metrics,
        settings.max_lora_variants,
        settings.lora_build_concurrency,
        denoiser,
    )


def serving_for(repository: Path, client: Callable[[], ModelControl], denoiser: str = specs.UNET) -> Serving:
    """Parameter serving for python-backend targets; a Triton model per variant for tensorrt."""
    try:
        config = (repository / denoiser / "config.pbtxt").read_text()
    except OSError:
        return ParameterServing()  # no repository here: variants fail later with a clear message
    if "tensorrt_plan" not in config:
        return ParameterServing()

    async def prepare(model: str, key: str, overrides: Path) -> None:
        """The variant's own Triton model: the base engine refitted with its overrides (TensorRT,
        on the GPU the engine was built for; a copy of the base engine's size on disk)."""
        try:
            await asyncio.to_thread(refit_variant, repository, model, key)
        except TensorRTUnavailable as e:
            raise InferenceFailed(f"LoRA variant of '{model}' cannot be refitted here: {e}") from e

    return ModelPerVariant(client, prepare)
