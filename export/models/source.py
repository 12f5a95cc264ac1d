"""Model sources: a Hugging Face model id or a local diffusers folder, and what its configs say.

Only JSON configs are read here; the torch weights are loaded by :mod:`export.models.modules` when exporting.
The service reads the same description (family, encoders, VAE scale) without loading weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from export.contract.families import SUPPORTED_PIPELINES, T5, ModelFamily, family_for
from export.contract.specs import UNET

logger = logging.getLogger(__name__)

# What the service needs from a Hub repository without its weights.
# An export reads these too, and then only the weight files it chose (export/models/weights.py): the safety
# checker's preprocessing, and the config at the top of a repository that is the checker itself.
CONFIG_PATTERNS = (
    "model_index.json",
    "config.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer*/*",
    "*preprocessor_config.json",
)


class ModelSourceError(ValueError):
    """The model id or folder cannot be used: missing, unsupported or incomplete."""


def resolve_model(model_id: str, *, weights: bool = True, cache_dir: Path | None = None) -> Path:
    """Return the local folder of ``model_id``: the folder itself, or a Hub snapshot.

    A Hub id is downloaded with ``huggingface_hub`` (on a host with network); ``weights=False`` fetches
    only the configs, tokenizers and scheduler the service reads (an export then fetches the weight
    files it reads with :func:`fetch_files`); ``cache_dir`` is the Hub cache (the service's
    ``MODEL_DIR``).
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelSourceError(f"model '{model_id}' is a file, not a diffusers folder")
    if path.is_absolute() or model_id.startswith(".") or model_id.count("/") != 1:
        raise ModelSourceError(f"model '{model_id}' is neither a local diffusers folder nor a Hub id")
    logger.info("fetching %s from the Hugging Face Hub (%s)", model_id, "all files" if weights else "configs")
    return fetch_files(model_id, None if weights else list(CONFIG_PATTERNS), cache_dir)


def hub_files(model_id: str) -> list[str]:
    """Every file of Hub repository ``model_id`` (relative paths), from its listing; nothing downloaded."""
    from huggingface_hub import HfApi

    return sorted(HfApi().list_repo_files(model_id))


def fetch_files(model_id: str, patterns: list[str] | None, cache_dir: Path | None = None) -> Path:
    """Download the files of Hub repository ``model_id`` that match ``patterns`` (None: all) into the Hub
    cache, with huggingface_hub's progress bars; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import tqdm

    return Path(snapshot_download(model_id, allow_patterns=patterns, cache_dir=cache_dir, tqdm_class=tqdm))


@dataclass(frozen=True)
class ModelSource:
    """A diffusers folder of a supported text-to-image pipeline."""

    path: Path

    def __post_init__(self) -> None:
        if not (self.path / "model_index.json").is_file():
            raise ModelSourceError(f"{self.path} is not a diffusers folder: model_index.json is missing")
        if family_for(self.model_index) is None:
            raise ModelSourceError(
                f"{self.path}: pipeline '{self.pipeline_class}' is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_PIPELINES))})"
            )

    @cached_property
    def model_index(self) -> dict[str, Any]:
        return read_json_object(self.path / "model_index.json")

    @property
    def pipeline_class(self) -> str:
        return str(self.model_index.get("_class_name", ""))

    @cached_property
    def family(self) -> ModelFamily:
        """What the pipeline class makes of the folder (:mod:`export.contract.families`)."""
        family = family_for(self.model_index)
        assert family is not None  # checked at construction
        return family

    @property
    def denoiser(self) -> str:
        """The diffusers subfolder (and Triton model) that denoises: ``unet`` or ``transformer``."""
        return self.family.denoiser

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.family.text_encoders)

    @property
    def t5_encoders(self) -> tuple[str, ...]:
        """The text encoders that are T5 (the last one of SD3 and FLUX); the others are CLIP."""
        return self.family.t5_encoders

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(e.tokenizer for e in self.family.text_encoders)

    @property
    def t5_tokenizers(self) -> tuple[str, ...]:
        """The tokenizers of the T5 encoders (T5's, loaded as ``T5Tokenizer``); the others are CLIP's."""
        return tuple(e.tokenizer for e in self.family.text_encoders if e.kind == T5)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        option = bool(self.model_index.get("force_zeros_for_empty_prompt", True))
        return self.family.force_zeros_option and option

    def config(self, component: str) -> dict[str, Any]:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return read_json_object(self.path / component / name)

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.config("vae")["block_out_channels"]) - 1))

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the loop draws: a UNet's input channels; a transformer's input is
        patched or packed (FLUX's 2x2), so the VAE's."""
        return self.in_channels if self.denoiser == UNET else int(self.config("vae")["latent_channels"])

    @property
    def in_channels(self) -> int:
        return int(self.config(self.denoiser)["in_channels"])

    @property
    def patch_size(self) -> int:
        """Latent pixels per transformer token side: FLUX's 2x2 packing, SD3's patch size; 1 for a UNet."""
        if self.family.packs_latents:
            return self.family.latent_packing
        return 1 if self.denoiser == UNET else int(self.config(self.denoiser).get("patch_size", 1))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE scale times the transformer's patch size."""
        return self.vae_scale_factor * self.patch_size

    @property
    def default_size(self) -> int:
        """The image side the denoiser was trained at (``sample_size`` latents times the VAE scale)."""
        return int(self.config(self.denoiser).get("sample_size", 128)) * self.vae_scale_factor


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        with path.open() as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ModelSourceError(f"missing {path}") from e
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return data
