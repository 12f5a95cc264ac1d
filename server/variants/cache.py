"""The LoRA disk cache: variant override files and downloaded LoRA files under one byte bound.

Entries (``variant:<key>`` and ``download:<owner--name>``) are deleted least recently used first when
room is needed, never one pinned by a request in flight or reserved by a build or download under
way.  A variant is complete once its record ``<repository>/<denoiser>/lora/records/<key>.json``
exists (written last; inside a model folder, which Triton reads only for its numbered versions, not in
the repository's root, where Triton takes every folder for a model); its last use is the record's
mtime, so a restarted service keeps the order.  At start, :meth:`DiskCache.scan` removes unfinished
files and override files no record names, then deletes least recently used entries until the cache
is within its bound.

All methods run on the event loop (they only stat, rename and unlink); builds and downloads write in
threads between :meth:`reserve` and :meth:`commit_variant` / :meth:`commit_download`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from export.contract.specs import VARIANT_KEY, VARIANTS_DIR
from server.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

# Inside the denoiser's model directory (the first of ``models``): the records and downloads.
LORA_DIR: Final = "lora"
RECORDS_DIR: Final = "records"
DOWNLOADS_DIR: Final = "downloads"


@dataclass(frozen=True)
class VariantRecord:
    """A complete variant on disk: ``files`` maps each Triton model it overrides to its file."""

    key: str
    files: dict[str, Path]
    nbytes: int


@dataclass
class _Entry:
    paths: tuple[Path, ...]
    nbytes: int
    last_used: float
    record: Path | None = None  # variants: the record whose mtime is the last use


def variant_entry(key: str) -> str:
    return f"variant:{key}"


def download_entry(name: str) -> str:
    return f"download:{name}"


class DiskCache:
    def __init__(self, repository: Path, downloads: Path, models: tuple[str, ...], limit_bytes: int) -> None:
        self.repository = repository
        self.records = repository / models[0] / LORA_DIR / RECORDS_DIR
        self.downloads = downloads
        self.models = models
        self.limit_bytes = limit_bytes
        self._entries: dict[str, _Entry] = {}
        self._reserved: dict[str, int] = {}
        self._pins: Counter[str] = Counter()

    # --- state -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(self._reserved.values())

    def names(self) -> list[str]:
        """Entries on disk, least recently used first."""
        return [n for n, _ in sorted(self._entries.items(), key=lambda item: item[1].last_used)]

    def variant(self, key: str) -> VariantRecord | None:
        entry = self._entries.get(variant_entry(key))
        if entry is None or entry.record is None:
            return None
        try:
            data = json.loads(entry.record.read_text())
        except (OSError, ValueError):
            return None
        files = {m: self.repository / p for m, p in data["files"].items()}
        return VariantRecord(key, files, entry.nbytes)

    def has(self, name: str) -> bool:
        return name in self._entries

    # --- use ---------------------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """Keep ``name`` (present or to come) from eviction until :meth:`unpin`."""
        self._pins[name] += 1

    def unpin(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] <= 0:
            del self._pins[name]

    def touch(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.last_used = time.time()
        marker = entry.record or (entry.paths[0] if entry.paths else None)
        if marker is not None:
            with contextlib.suppress(OSError):
                os.utime(marker, (entry.last_used, entry.last_used))

    def reserve(self, name: str, nbytes: int) -> None:
        """Make room for ``nbytes`` of ``name`` (deleting idle entries, least recently used first), or
        refuse (``lora_cache_full``) when the pinned entries and reservations leave too little."""
        self._trim(self.limit_bytes - nbytes, keep=name)
        if self.used_bytes + nbytes > self.limit_bytes:
            raise ServiceUnavailable(
                "The LoRA cache is full of variants in use; try again shortly."
                if nbytes <= self.limit_bytes
                else "This LoRA set does not fit in the service's LoRA cache (LORA_CACHE_GB).",
                reason="lora_cache_full",
            )
        self._reserved[name] = self._reserved.get(name, 0) + nbytes

    def _trim(self, target: int, keep: str = "") -> None:
        """Delete idle entries, least recently used first, until at most ``target`` bytes are used."""
        for victim in self.names():
            if self.used_bytes <= target:
                break
            if not self._pins[victim] and victim != keep:
                self._delete(victim)

    def release(self, name: str) -> None:
        """A reservation whose build or download failed."""
        self._reserved.pop(name, None)

    def commit_variant(self, key: str, files: dict[str, Path], loras: list[dict]) -> VariantRecord:
        name = variant_entry(key)
        self._reserved.pop(name, None)
        nbytes = sum(f.stat().st_size for f in files.values())
        self.records.mkdir(parents=True, exist_ok=True)
        record = self.records / f"{key}.json"
        partial = record.with_name(f".{record.name}.partial")
        relative = {m: str(f.relative_to(self.repository)) for m, f in files.items()}
        partial.write_text(json.dumps({"files": relative, "bytes": nbytes, "loras": loras}, indent=2) + "\n")
        partial.rename(record)  # written last: the variant is complete
        self._entries[name] = _Entry(tuple(files.values()), nbytes, time.time(), record)
        self._trim(self.limit_bytes, keep=name)  # the files' headers may exceed the reservation
        return VariantRecord(key, files, nbytes)

    def commit_download(self, folder_name: str) -> None:
        name = download_entry(folder_name)
        self._reserved.pop(name, None)
        folder = self.downloads / folder_name
        self._entries[name] = _Entry((folder,), _tree_bytes(folder), time.time())
        self._trim(self.limit_bytes, keep=name)

    # --- start -------------------------------------------------------------------------------

    def scan(self) -> None:
        """Read what a previous run left: complete variants and downloads; remove the rest; then
        bring the cache within its bound."""
        self._entries.clear()
        referenced: set[Path] = set()
        if self.records.is_dir():
            for record in self.records.iterdir():
                key = record.name.removesuffix(".json")
                try:
                    if not VARIANT_KEY.match(key) or record.suffix != ".json":
                        raise ValueError(record.name)
                    data = json.loads(record.read_text())
                    files = tuple(self.repository / p for p in data["files"].values())
                    nbytes = sum(f.stat().st_size for f in files)
                except (OSError, ValueError, KeyError, TypeError):
                    record.unlink(missing_ok=True)
                    continue
                referenced.update(files)
                self._entries[variant_entry(key)] = _Entry(files, nbytes, record.stat().st_mtime, record)
        for model in self.models:
            folder = self.repository / model / VARIANTS_DIR
            if folder.is_dir():
                for f in folder.iterdir():
                    if f not in referenced:
                        _remove(f)
        if self.downloads.is_dir():
            for folder in self.downloads.iterdir():
                if folder.name.startswith(".") or not folder.is_dir():
                    _remove(folder)
                    continue
                self._entries[download_entry(folder.name)] = _Entry(
                    (folder,), _tree_bytes(folder), folder.stat().st_mtime
                )
        self._trim(self.limit_bytes)
        logger.info(
            "LoRA cache: %d entries, %.1f MB of %.1f MB",
            len(self._entries),
            self.used_bytes / 2**20,
            self.limit_bytes / 2**20,
        )

    def _delete(self, name: str) -> None:
        entry = self._entries.pop(name)
        if entry.record is not None:
            entry.record.unlink(missing_ok=True)  # first: a crash leaves only unnamed files
        for path in entry.paths:
            _remove(path)
        logger.info("LoRA cache: deleted %s (%.1f MB, least recently used)", name, entry.nbytes / 2**20)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
