"""Which weight files of a model folder (or of a Hub repository's file listing) an export reads.

Hub repositories hold the same weights several times: full-precision and ``fp16`` variant files
(``save_pretrained(variant="fp16")`` names them ``<stem>.fp16.safetensors``), safetensors and pickled
``.bin`` files, sharded ones (``<stem>[.<variant>]-00001-of-00002.<ext>`` plus an index), and files no
export reads (``*.ckpt``, ``*.onnx``, flax and TF weights, ``non_ema`` variants).  For each component
folder :func:`choose_weights` picks one weight format and one variant from the folder's file names, the
same way for a local folder (its listing) and a Hub id (the repository's listing, before anything is
downloaded), so a download fetches only those files (:func:`allow_patterns`).

The variant follows the export's precision (:func:`variant_preference`): an fp16 (bf16) export reads the
``fp16`` (``bf16``) files when the folder has them, else the full files, which the loaders cast on load;
an fp32 export reads the full files, else the ``fp16`` ones cast up (a repository that ships only fp16
files).  ``--variant NAME`` asks for that variant first; ``--variant none`` for the full files only.
Within the preferred variants safetensors win over ``.bin``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from export.models.source import ModelSourceError

Library = Literal["diffusers", "transformers"]
# The file stems each library's ``from_pretrained`` reads, per format.
STEMS: Final[dict[Library, dict[str, str]]] = {
    "diffusers": {"safetensors": "diffusion_pytorch_model", "bin": "diffusion_pytorch_model"},
    "transformers": {"safetensors": "model", "bin": "pytorch_model"},
}
FORMATS: Final = ("safetensors", "bin")
# Variants chosen without being asked for (others, such as ``non_ema``, only when named).
AUTO_VARIANTS: Final = ("fp16", "bf16")
# ``--variant`` values besides a variant name: the target's choice, and the full files only.
AUTO: Final = "auto"
NO_VARIANT: Final = "none"

_WEIGHT = re.compile(
    r"^(?P<stem>[A-Za-z_]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-(?P<shard>\d{5}-of-\d{5}))?"
    r"\.(?P<ext>safetensors|bin)$"
)
_INDEX = re.compile(
    r"^(?P<stem>[A-Za-z_]+?)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$"
)


class MissingWeightsError(ModelSourceError):
    """A component folder holds no weight file the export can read."""


@dataclass(frozen=True)
class WeightChoice:
    """The weight files of one component folder an export reads: one format, one variant (None: the
    full files).  ``files`` are relative to the model root (the index file first for sharded weights)."""

    folder: str
    variant: str | None
    format: str
    files: tuple[str, ...]

    def from_pretrained_kwargs(self) -> dict[str, object]:
        """What ``from_pretrained`` (diffusers and transformers alike) needs to read exactly these files."""
        return {"variant": self.variant, "use_safetensors": self.format == "safetensors"}

    def describe(self) -> str:
        names = ", ".join(Path(f).name for f in self.files[:2]) + (" ..." if len(self.files) > 2 else "")
        return f"{self.folder}/{names}"


def variant_preference(precision: str, variant: str = AUTO) -> tuple[str | None, ...]:
    """Variants to try in order (None: the full files) for an export in ``precision``."""
    if variant == NO_VARIANT:
        return (None,)
    if variant != AUTO:
        return (variant, None)
    if precision in AUTO_VARIANTS:
        return (precision, None, *(v for v in AUTO_VARIANTS if v != precision))
    return (None, *AUTO_VARIANTS)


def choose_weights(
    files: Iterable[str], folder: str, library: Library, preference: tuple[str | None, ...], root: str = ""
) -> WeightChoice:
    """The weight files of ``folder`` (a path relative to the model root; ``files`` are the root's files,
    relative, with ``/``) for ``library``'s loader, in the order of ``preference``.

    Raises :class:`MissingWeightsError`, one line naming ``root/folder`` and the file patterns it lacks.
    """
    prefix = f"{folder}/" if folder else ""
    names = [f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]]
    for fmt in FORMATS:
        stem = STEMS[library][fmt]
        for variant in preference:
            single = f"{stem}.{variant}.{fmt}" if variant else f"{stem}.{fmt}"
            if single in names:
                return WeightChoice(folder, variant, fmt, (prefix + single,))
            shards = sorted(n for n in names if _is(_WEIGHT, n, stem, fmt, variant, shard=True))
            index = next((n for n in names if _is(_INDEX, n, stem, fmt, variant)), None)
            if shards and index is not None:
                return WeightChoice(folder, variant, fmt, tuple(prefix + n for n in (index, *shards)))
    where = f"{root.rstrip('/')}/{folder}" if root else folder
    raise MissingWeightsError(f"{where}: no weights: expected {_patterns(library, preference)}")


def _is(
    pattern: re.Pattern[str], name: str, stem: str, fmt: str, variant: str | None, shard: bool = False
) -> bool:
    m = pattern.match(name)
    if m is None or (shard and not m["shard"]):
        return False
    return bool(m["stem"] == stem and m["ext"] == fmt and m["variant"] == variant)


def _patterns(library: Library, preference: tuple[str | None, ...]) -> str:
    """``diffusion_pytorch_model[.fp16|.bf16].safetensors or ...bin``: the names looked for."""
    variants = "|".join(f".{v}" for v in preference if v)
    infix = f"[{variants}]" if variants and None in preference else variants
    names = " or ".join(f"{stem}{infix}.{fmt}" for fmt, stem in STEMS[library].items())
    return f"{names} (or their shards)"


def allow_patterns(choices: Iterable[WeightChoice]) -> list[str]:
    """The ``snapshot_download(allow_patterns=...)`` entries that fetch exactly the chosen files."""
    return sorted({f for c in choices for f in c.files})


def folder_files(root: Path) -> list[str]:
    """Every file under ``root``, relative, with ``/`` (what :func:`choose_weights` reads locally)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
