"""The variant manager for a service's settings and model repository (its pieces, wired once)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from export import specs
from server.errors import InferenceFailed
from server.metrics import Metrics
from server.settings import Settings
from server.variants.cache import DiskCache
from server.variants.residency import ModelControl, ModelPerVariant, ParameterServing, Serving, VariantManager
from server.variants.sources import HubPolicy, LoraSources

DOWNLOADS_DIR = ".lora-downloads"


def variant_manager(
    settings: Settings,
    text_encoders: tuple[str, ...],
    client: Callable[[], ModelControl],
    metrics: Metrics,
) -> VariantManager:
    """Reads the disk cache (bringing it within LORA_CACHE_GB): call it off the event loop."""
    repository = settings.model_repository.resolve()
    folders = [settings.lora_dir] if settings.lora_dir is not None else []
    folders += [Path(p) for p in settings.lora_extra_dirs.split(os.pathsep) if p]
    hub = HubPolicy(
        enabled=settings.lora_hub,
        timeout_s=settings.lora_hub_timeout_s,
        max_bytes=int(settings.lora_max_mb * 2**20),
        endpoint=settings.hf_endpoint,
    )
    downloads = repository / DOWNLOADS_DIR
    cache = DiskCache(
        repository, downloads, (specs.UNET, *text_encoders), int(settings.lora_cache_gb * 2**30)
    )
    cache.scan()
    return VariantManager(
        repository,
        text_encoders,
        LoraSources(tuple(folders), hub, downloads),
        cache,
        serving_for(repository, client),
        metrics,
        settings.max_lora_variants,
        settings.lora_build_concurrency,
    )


def serving_for(repository: Path, client: Callable[[], ModelControl]) -> Serving:
    """Parameter serving for python-backend targets; a Triton model per variant for tensorrt."""
    try:
        config = (repository / specs.UNET / "config.pbtxt").read_text()
    except OSError:
        return ParameterServing()  # no repository here: variants fail later with a clear message
    if "tensorrt_plan" not in config:
        return ParameterServing()

    async def prepare(model: str, key: str, overrides: Path) -> None:
        raise InferenceFailed(
            f"LoRA variants of the tensorrt model '{model}' need the engine refit step, "
            "which this build does not include."
        )

    return ModelPerVariant(client, prepare)
