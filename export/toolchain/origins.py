"""Where a model's files come from (a local folder or a Hub repository) and the weight files each
component reads: chosen from the listing before anything is exported, then fetched (from the Hub,
only those files)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from export.models.modules import Component
from export.models.precision import Precision
from export.models.source import CONFIG_PATTERNS, fetch_files, hub_files, resolve_model
from export.models.weights import WeightChoice, allow_patterns, folder_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Origin:
    """Where a model folder came from: a local folder, or a Hub repository whose configs are in ``root``
    and whose weight files are fetched once chosen (from the repository's listing)."""

    model_id: str
    root: Path
    hub: bool

    @classmethod
    def resolve(cls, model_id: str) -> Origin:
        hub = not Path(model_id).expanduser().is_dir()
        return cls(model_id, resolve_model(model_id, weights=False), hub)

    def files(self, root: Path) -> list[str]:
        """Every file of the model, relative to ``root`` (the folder a component's subfolders are
        relative to: this model's folder, or its parent for a checker that is a repository itself)."""
        if not self.hub:
            return folder_files(root)
        prefix = self.root.relative_to(root).as_posix()
        return [f if prefix == "." else f"{prefix}/{f}" for f in hub_files(self.model_id)]

    def fetch(self, choices: list[WeightChoice], root: Path) -> None:
        if self.hub and choices:
            logger.info("fetching %s: %s", self.model_id, ", ".join(c.describe() for c in choices))
            prefix = self.root.relative_to(root).as_posix()
            files = [f.removeprefix(f"{prefix}/") for f in allow_patterns(choices)]
            fetch_files(self.model_id, [*CONFIG_PATTERNS, *files])


def choose_weights(
    parts: list[Component],
    origins: dict[str, Origin],
    precisions: dict[str, tuple[Precision, str]],
    variant: str,
) -> dict[str, WeightChoice]:
    """Each component's weight files, chosen from its origin's listing; a Hub origin then downloads
    exactly those.  Raises :class:`export.models.weights.MissingWeightsError` for the first folder
    lacking any."""
    listings: dict[tuple[Origin, Path], list[str]] = {}
    weights: dict[str, WeightChoice] = {}
    for c in parts:
        key = (origins[c.spec.name], c.root)
        if key not in listings:
            listings[key] = key[0].files(c.root)
        weights[c.spec.name] = c.weights(precisions[c.spec.name][0], variant, files=listings[key])
    for origin, root in listings:
        chosen = [weights[c.spec.name] for c in parts if (origins[c.spec.name], c.root) == (origin, root)]
        origin.fetch(chosen, root)
    return weights
