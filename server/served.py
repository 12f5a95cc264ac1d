"""The models of MODEL_ID / MODEL_IDS / PINNED_MODEL_IDS, parsed and checked (server/settings.py reads
them; docs/models.md explains them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple


class SettingsError(ValueError):
    pass


class ServedModel(NamedTuple):
    """One model of MODEL_ID / MODEL_IDS: its id, its exported repository, and the prefix of its Triton
    model names in the one Triton that serves them all (empty for MODEL_ID alone: the bare names)."""

    model_id: str
    repository: Path
    alias: str
    pinned: bool


def _alias(repository: Path, index: int) -> str:
    """A Triton-safe prefix from the repository's folder name (``sdxl-turbo``), unique by its index.
    No ``__`` (LoRA variants' names use it) and no ``.`` (the prefix's own separator)."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", repository.resolve().name).strip("-")[:40] or "model"
    return f"m{index}-{name}"


def served_models(
    model_id: str, model_ids: str, pinned_model_ids: str, model_repository: Path
) -> tuple[ServedModel, ...]:
    """The served models, the default (first) first; raises :class:`SettingsError` naming the problem."""
    if bool(model_id) == bool(model_ids.strip()):
        raise SettingsError(
            "set MODEL_ID (one model) or MODEL_IDS (several), not both"
            if model_id
            else "MODEL_ID is required: Hub id or local diffusers folder (or MODEL_IDS: several models)"
        )
    if model_id:
        return (ServedModel(model_id, model_repository, "", pinned=True),)
    entries = [e.strip() for e in model_ids.split(",") if e.strip()]
    parsed = [e.partition("=") for e in entries]
    pins = {p.strip() for p in pinned_model_ids.split(",") if p.strip()}
    ids = [entry_id.strip() for entry_id, _, _ in parsed]
    if not pins:
        pins = {ids[0]}
    elif pins == {"none"}:
        pins = set()
    unknown = sorted(pins - set(ids))
    if unknown:
        raise SettingsError(f"PINNED_MODEL_IDS names models not in MODEL_IDS: {', '.join(unknown)}")
    models: list[ServedModel] = []
    for entry_id, _, repository in parsed:
        entry_id, repository = entry_id.strip(), repository.strip()
        if not entry_id:
            raise SettingsError(f"MODEL_IDS has an entry without a model id: {model_ids!r}")
        path = Path(repository) if repository else model_repository / entry_id.rstrip("/").split("/")[-1]
        models.append(ServedModel(entry_id, path, _alias(path, len(models)), entry_id in pins))
    for what, values in (("model id", ids), ("repository", [str(m.repository) for m in models])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise SettingsError(f"MODEL_IDS names the same {what} twice: {', '.join(twice)}")
    return tuple(models)
