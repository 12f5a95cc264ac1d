"""Where a LoRA id may come from: a name under ``LORA_DIR`` (or another folder the operator allows)
or a Hugging Face Hub repository id.  Nothing else on the host is read.

Every id that is not one of those, or that leaves its folder (absolute paths, ``..``, ``~``, symlinks
out of the folder), answers exactly like a missing LoRA: ``LoRa repository '<id>' not found`` with
the id shortened, and no message names a host file or lists a folder.

Hub work (``HfApi.model_info`` and the download) runs on a small thread pool of its own, never on the
event loop, under ``LORA_HUB_TIMEOUT_S``; only ``.safetensors`` files up to ``LORA_MAX_MB`` are
fetched, into the LoRA cache's download folder, which the disk bound covers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from export.models.lora import DIFFUSERS_WEIGHT_NAME, LoraNotFound
from server.errors import BadRequest, ServiceUnavailable

logger = logging.getLogger(__name__)

# Longest id echoed back in a message.
SHOWN_ID_CHARS: Final = 64
# Hub repository ids: owner/name, as the Hub allows them (no "..", no leading "-" or ".").
_HUB_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_HUB_THREADS: Final = 2


def shown(lora_id: str) -> str:
    """``lora_id`` as a message may show it: printable and at most :data:`SHOWN_ID_CHARS` long."""
    text = "".join(c if c.isprintable() else "?" for c in lora_id[: SHOWN_ID_CHARS + 1])
    return text if len(text) <= SHOWN_ID_CHARS else text[: SHOWN_ID_CHARS - 3] + "..."


def not_found(lora_id: str) -> BadRequest:
    return BadRequest(str(LoraNotFound(shown(lora_id))))


@dataclass(frozen=True)
class ResolvedLora:
    """One LoRA file: ``identity`` names the file itself (its real path, size and mtime), so the same
    file named several ways is one LoRA; ``download`` is its cache entry when it came from the Hub."""

    lora_id: str
    file: Path
    identity: str
    download: str = ""


@dataclass(frozen=True)
class HubPolicy:
    enabled: bool
    timeout_s: float
    max_bytes: int
    endpoint: str  # "" = the library's default (https://huggingface.co)


class LoraSources:
    def __init__(self, folders: tuple[Path, ...], hub: HubPolicy, downloads: Path) -> None:
        self.folders = tuple(f.resolve() for f in folders)
        self.hub = hub
        self.downloads = downloads
        self._pool = concurrent.futures.ThreadPoolExecutor(_HUB_THREADS, thread_name_prefix="lora-hub")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def local(self, lora_id: str) -> ResolvedLora | None:
        """The file ``lora_id`` names under an allowed folder, or None.  Cheap (a few stat calls)."""
        if not _plain_relative(lora_id):
            return None
        for root in self.folders:
            for candidate in (root / lora_id, root / f"{lora_id}.safetensors"):
                file = _inside(candidate, root)
                if file is not None:
                    return _resolved(lora_id, file)
        return None

    def downloaded(self, lora_id: str) -> ResolvedLora | None:
        """A Hub LoRA already in the download folder."""
        if not self.hub.enabled or not _HUB_ID.match(lora_id):
            return None
        folder = self.downloads / download_name(lora_id)
        file = _inside(folder, folder.resolve()) if folder.is_dir() else None
        return None if file is None else _resolved(lora_id, file, download_name(lora_id))

    async def fetch(self, lora_id: str, reserve: Callable[[int], None]) -> ResolvedLora:
        """Download a Hub LoRA (off the event loop, under the Hub timeout); BadRequest when it is not one.

        ``reserve(bytes)`` is called before any byte is written (the disk cache makes room or refuses).
        """
        if not self.hub.enabled or not _HUB_ID.match(lora_id):
            raise not_found(lora_id)
        loop = asyncio.get_running_loop()
        try:
            size, filename = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._hub_file, lora_id), self.hub.timeout_s
            )
            reserve(size)
            folder = self.downloads / download_name(lora_id)
            await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._download, lora_id, filename, folder),
                self.hub.timeout_s,
            )
        except TimeoutError:
            raise ServiceUnavailable(
                f"LoRa repository '{shown(lora_id)}' could not be fetched from the Hub within "
                f"{self.hub.timeout_s:g} s; try again later.",
                reason="hub_timeout",
            ) from None
        found = self.downloaded(lora_id)
        if found is None:
            raise not_found(lora_id)
        return found

    def _hub_file(self, lora_id: str) -> tuple[int, str]:
        """The one safetensors file of the repository and its size (LORA_MAX_MB checked)."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.hub.endpoint or None)
        try:
            # the thread's own timeout is longer than the request's wait: a Hub that does not answer
            # is refused (hub_timeout: the wait runs out), and the thread still ends by itself soon after
            info = api.model_info(lora_id, files_metadata=True, timeout=2 * self.hub.timeout_s)
        except Exception as e:  # unknown, gated, offline: the client learns only "not found"
            logger.info("LoRA %s not found on the Hub: %s", shown(lora_id), type(e).__name__)
            raise not_found(lora_id) from None
        files = {
            s.rfilename: s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")
        }
        top = [f for f in files if "/" not in f]
        name = DIFFUSERS_WEIGHT_NAME if DIFFUSERS_WEIGHT_NAME in top else (top[0] if len(top) == 1 else None)
        if name is None:
            raise BadRequest(
                f"LoRa incompatible with base model: '{shown(lora_id)}' holds no single .safetensors "
                f"LoRA file (expected {DIFFUSERS_WEIGHT_NAME} or exactly one)"
            )
        if files[name] > self.hub.max_bytes:
            raise BadRequest(
                f"LoRa incompatible with base model: '{shown(lora_id)}' is larger than this service's "
                f"limit of {self.hub.max_bytes / 2**20:g} MB"
            )
        return files[name], name

    def _download(self, lora_id: str, filename: str, folder: Path) -> None:
        from huggingface_hub import hf_hub_download

        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            path = Path(
                hf_hub_download(
                    lora_id,
                    filename,
                    local_dir=partial,
                    endpoint=self.hub.endpoint or None,
                    etag_timeout=2 * self.hub.timeout_s,
                )
            )
            if path.stat().st_size > self.hub.max_bytes:
                raise BadRequest(
                    f"LoRa incompatible with base model: '{shown(lora_id)}' is larger than this "
                    f"service's limit of {self.hub.max_bytes / 2**20:g} MB"
                )
            folder.mkdir(parents=True, exist_ok=True)
            path.rename(folder / filename)
        except BadRequest:
            raise
        except Exception as e:  # network, disk: the client learns only that it is not available
            logger.warning("LoRA %s download failed: %s", shown(lora_id), type(e).__name__)
            raise not_found(lora_id) from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def download_name(lora_id: str) -> str:
    """The download folder's name for a Hub id (``owner--name``: no separators, unique per id)."""
    return lora_id.replace("/", "--")


def _plain_relative(lora_id: str) -> bool:
    """A relative name with no way out of its folder (resolution checks symlinks after this)."""
    if not lora_id or len(lora_id) > 255 or "\x00" in lora_id or "\\" in lora_id:
        return False
    if lora_id.startswith(("/", "~")) or lora_id != lora_id.strip():
        return False
    parts = lora_id.split("/")
    return all(p not in ("", ".", "..") and not p.startswith("~") for p in parts)


def _inside(candidate: Path, root: Path) -> Path | None:
    """The safetensors file ``candidate`` names (a file, or a folder holding diffusers' file or exactly
    one), when it really lies inside ``root`` after symlinks; otherwise None."""
    try:
        real = candidate.resolve(strict=True)
        if not real.is_relative_to(root):
            return None
        if real.is_dir():
            inner = real / DIFFUSERS_WEIGHT_NAME
            if not inner.is_file():
                files = [f for f in real.iterdir() if f.suffix == ".safetensors" and f.is_file()]
                if len(files) != 1:
                    return None
                inner = files[0]
            real = inner.resolve(strict=True)
            if not real.is_relative_to(root):
                return None
        return real if real.is_file() and real.suffix == ".safetensors" else None
    except (OSError, RuntimeError, ValueError):  # loops, names too long, odd bytes
        return None


def _resolved(lora_id: str, file: Path, download: str = "") -> ResolvedLora:
    stat = file.stat()
    return ResolvedLora(lora_id, file, f"{file}|{stat.st_size}|{stat.st_mtime_ns}", download)
