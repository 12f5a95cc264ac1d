"""LoRA variants: each LoRA set is a merged copy of the UNet (and text encoders it touches) in Triton.

1. resolve each LoRA id: a local file or folder, a name under ``LORA_DIR``, or a Hub repository
2. name the variant after the set (sorted ids, file digests, strengths, the base model's fingerprint)
3. build it once: concurrent first requests share one build; the result stays on disk in the model
   repository (``unet__<hash>/``), so a restarted service loads it without merging again
4. load it into Triton with explicit model control; at most ``MAX_LORA_VARIANTS`` stay loaded, the
   least recently used idle one is unloaded first
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export import specs
from export.lora import (
    ONNX_PREFIXES,
    LoraError,
    LoraNotFound,
    OnnxGraph,
    check_components,
    load_graph,
    load_lora,
    merge_deltas,
    onnx_state,
    write_merged_onnx,
)
from export.repository import FINGERPRINT_FILE, MANIFEST_FILE
from server.errors import BadRequest, InferenceFailed
from server.metrics import Metrics
from server.settings import Settings
from server.triton.client import TritonClient

logger = logging.getLogger(__name__)

VARIANT_FILE = ".variant.json"


@dataclass(frozen=True)
class VariantModels:
    """The Triton models one request runs: base names, or variant names where its LoRAs apply."""

    unet: str
    text_encoders: tuple[str, ...]
    key: str = ""  # empty for the base model

    @property
    def names(self) -> tuple[str, ...]:
        return (self.unet, *self.text_encoders)


@dataclass(frozen=True)
class _Source:
    lora_id: str
    path: Path
    weight: float


class VariantManager:
    def __init__(
        self,
        settings: Settings,
        repository: Path,
        text_encoders: tuple[str, ...],
        client: Callable[[], TritonClient],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.text_encoders = text_encoders
        self.base = VariantModels(specs.UNET, text_encoders)
        self._client = client
        self.metrics = metrics
        self._builds: dict[str, asyncio.Task[VariantModels]] = {}
        self._loaded: OrderedDict[str, VariantModels] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._base_digest: bytes | None = None  # the base models' export fingerprints, read once
        self._lock = asyncio.Lock()

    def loaded(self) -> list[VariantModels]:
        """Variants loaded in Triton now, least recently used first."""
        return list(self._loaded.values())

    def forget_loaded(self) -> None:
        """Triton lost its models (restart): variants must be loaded again on next use."""
        self._loaded.clear()
        self.metrics.variants_loaded.set(0)

    @contextlib.asynccontextmanager
    async def use(self, loras: dict[str, float]) -> AsyncIterator[VariantModels]:
        """The models for ``loras`` (built and loaded as needed), kept loaded while the block runs."""
        if any(w != 0 for w in loras.values()):
            self._check_target()
        sources = [_Source(i, self._resolve(i), w) for i, w in sorted(loras.items()) if w != 0]
        if not sources:
            yield self.base
            return
        key = self._key(sources)
        models = await self._ensure(key, sources)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield models
        finally:
            self._in_use[key] -= 1
            if not self._in_use[key]:
                del self._in_use[key]

    async def _ensure(self, key: str, sources: list[_Source]) -> VariantModels:
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        task = self._builds.get(key)
        if task is None:
            task = asyncio.create_task(self._build_and_load(key, sources))
            self._builds[key] = task
            task.add_done_callback(lambda _: self._builds.pop(key, None))
        return await asyncio.shield(task)

    async def _build_and_load(self, key: str, sources: list[_Source]) -> VariantModels:
        models = await asyncio.to_thread(self._read_variant, key)
        if models is None:
            started = time.perf_counter()
            try:
                models = await asyncio.to_thread(self._build, key, sources)
            except LoraError as e:
                raise BadRequest(str(e)) from None
            seconds = time.perf_counter() - started
            self.metrics.variant_builds.inc()
            self.metrics.variant_build_seconds.observe(seconds)
            logger.info("built LoRA variant %s in %.2f s: %s", key, seconds, _describe(sources))
        client = self._client()
        for name in models.names:
            if name not in self.base.names:
                await client.load_model(name)
        async with self._lock:
            self._loaded[key] = models
            self._loaded.move_to_end(key)
            await self._evict(client)
        return models

    async def _evict(self, client: TritonClient) -> None:
        """Unload least recently used idle variants beyond the bound (busy ones stay)."""
        for key in list(self._loaded):
            if len(self._loaded) <= self.settings.max_lora_variants:
                break
            if self._in_use.get(key, 0) or key == next(reversed(self._loaded)):
                continue
            models = self._loaded.pop(key)
            for name in models.names:
                if name not in self.base.names:
                    await client.unload_model(name)
            logger.info("unloaded LoRA variant %s (least recently used)", key)
        self.metrics.variants_loaded.set(len(self._loaded))

    def _check_target(self) -> None:
        """Variants are built here as merged ONNX graphs, which a python-torch repository has none of
        (its models take ``variants/<key>.safetensors`` overrides and the ``lora_variant`` request
        parameter): refuse LoRAs there with a clear 400 rather than fail the build."""
        try:
            target = json.loads((self.repository / MANIFEST_FILE).read_text()).get("target")
        except (OSError, ValueError, AttributeError):
            return
        if target == "python-torch":
            raise BadRequest("LoRAs are not available on the python-torch target of this service yet.")

    def _resolve(self, lora_id: str) -> Path:
        """A local file or folder, a name under LORA_DIR, or a Hub repository (where there is network)."""
        for candidate in (Path(lora_id).expanduser(), *self._in_lora_dir(lora_id)):
            if candidate.exists():
                return candidate
        if lora_id.count("/") == 1 and not lora_id.startswith((".", "/")):
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(
                    lora_id, allow_patterns=["*.safetensors"], cache_dir=self.settings.model_dir
                )
                return Path(path)
            except Exception as e:  # offline, unknown repository, gated...
                logger.info("LoRA %s not on the Hub: %s", lora_id, e)
        raise BadRequest(str(LoraNotFound(lora_id)))

    def _in_lora_dir(self, lora_id: str) -> list[Path]:
        root = self.settings.lora_dir
        if root is None or Path(lora_id).is_absolute() or ".." in Path(lora_id).parts:
            return []
        return [root / lora_id, root / f"{lora_id}.safetensors"]

    def _key(self, sources: list[_Source]) -> str:
        h = hashlib.sha256(self._base_fingerprints())
        for s in sources:
            h.update(f"{s.lora_id}|{s.path.resolve()}|{s.path.stat().st_mtime_ns}|{s.weight!r}".encode())
        return h.hexdigest()[:16]

    def _base_fingerprints(self) -> bytes:
        """The base models' export fingerprints: part of every variant's name, so a re-exported base
        never meets an old variant.  Fixed while this Triton serves the base, so read once."""
        if self._base_digest is None:
            h = hashlib.sha256()
            for name in self.base.names:
                try:
                    h.update((self.repository / name / FINGERPRINT_FILE).read_bytes())
                except OSError:
                    raise InferenceFailed(
                        f"LoRA variants are unavailable: MODEL_REPOSITORY ({self.repository}) does not hold "
                        f"the exported model '{name}' that Triton serves"
                    ) from None
            self._base_digest = h.digest()
        return self._base_digest

    def _read_variant(self, key: str) -> VariantModels | None:
        """A variant built before (by this process or an earlier one), if complete on disk."""
        try:
            recorded = json.loads((self.repository / f"{specs.UNET}__{key}" / VARIANT_FILE).read_text())
        except (OSError, ValueError):
            return None
        models = VariantModels(recorded["unet"], tuple(recorded["text_encoders"]), key)
        complete = all((self.repository / n / "config.pbtxt").is_file() for n in models.names)
        return models if complete else None

    def _build(self, key: str, sources: list[_Source]) -> VariantModels:
        loras = [(load_lora(s.path, s.lora_id), s.weight) for s in sources]
        for lora, _ in loras:
            check_components(lora, ("unet", *self.text_encoders))
        names: dict[str, str] = {}
        for component in ("unet", *self.text_encoders):
            graph = load_graph(self.repository / component / "1" / "model.onnx")  # read once
            base_state = onnx_state(graph, ONNX_PREFIXES[component])
            deltas = merge_deltas(base_state, loras, component)
            del base_state
            if deltas or component == "unet":
                names[component] = f"{component}__{key}"
                self._write_model(component, names[component], deltas, graph)
        models = VariantModels(names["unet"], tuple(names.get(t, t) for t in self.text_encoders), key)
        record = {
            "unet": models.unet,
            "text_encoders": list(models.text_encoders),
            "loras": [{"id": s.lora_id, "weight": s.weight} for s in sources],
        }
        # Written last: the UNet variant's record marks the whole set complete.
        (self.repository / models.unet / VARIANT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return models

    def _write_model(self, base: str, name: str, deltas: dict, graph: OnnxGraph) -> None:
        """``repository/name``: the base model's config (renamed), code, and the merged ONNX graph."""
        target = self.repository / name
        staging = self.repository / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "1").mkdir(parents=True)
        write_merged_onnx(graph, deltas, staging / "1" / "model.onnx", ONNX_PREFIXES[base])
        shutil.copyfile(self.repository / base / "1" / "model.py", staging / "1" / "model.py")
        config = text_format.Parse((self.repository / base / "config.pbtxt").read_text(), mc.ModelConfig())
        config.name = name
        (staging / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)


def _describe(sources: list[_Source]) -> str:
    return ", ".join(f"{s.lora_id}={s.weight:g}" for s in sources)
