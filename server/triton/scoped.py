"""Several models in one Triton: their Triton model names, the repository the bundled Triton serves
them from, and each model's view of the client.

Every exported repository names its Triton models after their part (``unet``, ``vae_decoder``,
``text_encoder``...), so two models' repositories cannot be served side by side as they are.  With
several models (``MODEL_IDS``) model ``m``'s part ``unet`` is the Triton model ``<alias>.unet``
(:func:`triton_name`, the alias from :class:`server.settings.ServedModel`), served from one folder
of symbolic links, ``<alias>.unet`` -> ``<m's repository>/unet`` (:func:`compose_repository`).  A
``config.pbtxt`` that carries a name is left without one (Triton then names the model after its
folder, as the exporter now writes it).  The model's code keeps its parts' names: its
:class:`ModelClient` adds the prefix on every call, and links a LoRA variant's folder (tensorrt:
``unet__<key>``, written after the start) before it loads.  One model alone (``MODEL_ID``) is served
from its repository as it is, by the bare names and the plain client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np

from export.contract.specs import VARIANT_SEPARATOR
from server.triton.client import TritonClient

logger = logging.getLogger(__name__)

SEPARATOR = "."
CONFIG = "config.pbtxt"
_TOP_LEVEL_NAME = re.compile(r'^name: "[^"\n]*"\n', re.MULTILINE)


def triton_name(alias: str, model: str) -> str:
    """The Triton name of part ``model`` of the served model with ``alias`` (bare without one)."""
    return f"{alias}{SEPARATOR}{model}" if alias else model


def triton_models(repository: Path) -> list[Path]:
    """The Triton model folders of an exported repository (not the exporter's partial ones)."""
    if not repository.is_dir():
        return []
    return sorted(p for p in repository.iterdir() if not p.name.startswith(".") and (p / CONFIG).is_file())


def drop_config_name(model_dir: Path) -> None:
    """Leave ``model_dir``'s config without its ``name`` (Triton names the model after its folder,
    so the same config serves under a link of another name)."""
    path = model_dir / CONFIG
    text = path.read_text()
    unnamed = _TOP_LEVEL_NAME.sub("", text)
    if unnamed != text:
        staged = path.with_name(f".{CONFIG}.unnamed")
        staged.write_text(unnamed)
        staged.replace(path)


def link_model(directory: Path, alias: str, model_dir: Path) -> Path:
    """``directory/<alias>.<model>`` -> ``model_dir`` (replaced when it pointed elsewhere)."""
    drop_config_name(model_dir)
    link = directory / triton_name(alias, model_dir.name)
    target = model_dir.resolve()
    if link.is_symlink() and link.resolve() == target:
        return link
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def compose_repository(directory: Path, models: Iterable[tuple[str, Path]]) -> None:
    """The repository of several models: one link per Triton model of each ``(alias, repository)``;
    links of models no longer served are removed (the folder holds links only)."""
    directory.mkdir(parents=True, exist_ok=True)
    kept = set()
    for alias, repository in models:
        for model_dir in triton_models(repository.resolve()):
            kept.add(link_model(directory, alias, model_dir).name)
    for entry in directory.iterdir():
        if entry.is_symlink() and entry.name not in kept:
            entry.unlink()


class ModelClient:
    """One served model's Triton client: its parts' names in, the prefixed names out."""

    def __init__(self, client: TritonClient, alias: str, repository: Path, composed: Path | None) -> None:
        self.client = client
        self.alias = alias
        self.repository = repository
        self.composed = composed  # the folder Triton serves several models from (None: one model)
        # GPU memory in use (Triton's metric), or None; set, a LoRA variant's load is measured.
        self.meter: Callable[[], Awaitable[int | None]] | None = None
        self.variant_bytes: dict[str, int] = {}  # what each loaded variant model took (GPU)

    @property
    def url(self) -> str:
        return self.client.url

    def name(self, model: str) -> str:
        return triton_name(self.alias, model)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        return await self.client.infer(self.name(model), inputs, outputs, parameters)

    async def max_batch_size(self, name: str) -> int:
        return await self.client.max_batch_size(self.name(name))

    def shared(
        self, arrays: Mapping[str, np.ndarray], uses: int
    ) -> AbstractAsyncContextManager[Mapping[str, Any]]:
        return self.client.shared(arrays, uses)

    async def model_ready(self, name: str) -> bool:
        return await self.client.model_ready(self.name(name))

    async def backend(self, name: str) -> str:
        return await self.client.backend(self.name(name))

    async def load_model(self, name: str) -> None:
        """Load part ``name``; a folder written since the start (a LoRA variant's) is linked first."""
        if self.composed is not None and (self.repository / name / CONFIG).is_file():
            link_model(self.composed, self.alias, self.repository / name)
        variant = VARIANT_SEPARATOR in name
        before = await self.meter() if variant and self.meter is not None else None
        await self.client.load_model(self.name(name))
        after = await self.meter() if before is not None and self.meter is not None else None
        if before is not None and after is not None:
            self.variant_bytes[name] = max(0, after - before)

    async def unload_model(self, name: str) -> None:
        self.variant_bytes.pop(name, None)
        await self.client.unload_model(self.name(name))
