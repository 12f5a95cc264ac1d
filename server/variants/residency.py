"""Which LoRA variants are in use and resident, and how a request gets its variant.

``VariantManager.use(loras)`` is the one entry point:

1. resolve each id (:mod:`server.variants.sources`): a name under an allowed folder, or a Hub id
   (fetched off the event loop, under the Hub timeout and the disk bound);
2. normalise the set: ids naming the same file are one LoRA (their weights add up), weights are
   rounded to :data:`WEIGHT_DECIMALS` places, zero weights dropped; the key is a hash of the base
   models' export fingerprints and the sorted (file identity, weight) pairs;
3. take a residency slot: at most ``MAX_LORA_VARIANTS`` distinct variants are in use at once (a
   request for another one waits, within its deadline); the variant is marked in use in the same
   step, before any await, so no other request's eviction can see it idle;
4. build it once if the disk cache lacks it (concurrent requests share one build; at most
   ``LORA_BUILD_CONCURRENCY`` builds run) with
   :func:`export.models.variant_build.plan_variant` (checks, and reserves its bytes in the cache) then
   :func:`~export.models.variant_build.write_variant` (merges and writes);
5. make it resident through the serving mode of the target: python-backend targets serve a variant
   from the base model by the request parameter ``lora_variant`` (nothing to load; the model keeps
   its own LRU of sessions); the tensorrt target serves it as the Triton model ``M__K``, loaded and
   unloaded through the repository API, least recently used idle one first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from export.contract import specs
from export.contract.specs import FINGERPRINT_FILE, VARIANT_PARAMETER, VARIANT_SEPARATOR
from export.models.heap import return_free_memory
from export.models.lora import LoraError
from export.models.variant_build import BaseIndex, LoraInput, plan_variant, write_variant
from server.errors import BadRequest, InferenceFailed, OutOfMemory
from server.metrics import ModelMetrics
from server.variants.cache import DiskCache, VariantRecord, download_entry, variant_entry
from server.variants.sources import LoraSources, ResolvedLora, download_name, shown

logger = logging.getLogger(__name__)

# Weights are rounded to this many decimals in the variant key and in the merge.
WEIGHT_DECIMALS: Final = 6


@dataclass(frozen=True)
class VariantModels:
    """The Triton models one request runs, and the request parameters each of them gets."""

    denoiser: str  # the UNet or transformer
    text_encoders: tuple[str, ...]
    key: str = ""  # empty for the base model
    parameters: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)


class ModelControl(Protocol):
    """The part of the Triton client the tensorrt serving mode needs."""

    async def load_model(self, name: str) -> None: ...

    async def unload_model(self, name: str) -> None: ...


class Serving(Protocol):
    """How a target serves a built variant."""

    def models(self, base: VariantModels, record: VariantRecord) -> VariantModels: ...

    async def load(self, models: VariantModels) -> None: ...

    async def unload(self, models: VariantModels) -> None: ...


class ParameterServing:
    """python-onnx / python-torch: the base model serves its variants, chosen by ``lora_variant``."""

    def models(self, base: VariantModels, record: VariantRecord) -> VariantModels:
        params = {m: {VARIANT_PARAMETER: record.key} for m in record.files}
        return VariantModels(base.denoiser, base.text_encoders, record.key, params)

    async def load(self, models: VariantModels) -> None:
        return None  # the model opens the variant's session on its first batch

    async def unload(self, models: VariantModels) -> None:
        return None  # the model closes its least recently used session itself


class ModelPerVariant:
    """tensorrt: variant ``K`` of model ``M`` is the Triton model ``M__K``; ``prepare(M, K, overrides)``
    writes its folder (a refitted copy of the base engine) before it is loaded."""

    def __init__(
        self,
        client: Callable[[], ModelControl],
        prepare: Callable[[str, str, Path], Awaitable[None]],
    ) -> None:
        self._client = client
        self._prepare = prepare
        self._files: dict[str, dict[str, Path]] = {}

    def models(self, base: VariantModels, record: VariantRecord) -> VariantModels:
        def name(model: str) -> str:
            return f"{model}{VARIANT_SEPARATOR}{record.key}" if model in record.files else model

        self._files[record.key] = record.files
        return VariantModels(name(base.denoiser), tuple(name(t) for t in base.text_encoders), record.key)

    async def load(self, models: VariantModels) -> None:
        client = self._client()
        for name in models.names:
            base, _, key = name.partition(VARIANT_SEPARATOR)
            if key:
                await self._prepare(base, key, self._files[key][base])
                await client.load_model(name)

    async def unload(self, models: VariantModels) -> None:
        client = self._client()
        for name in models.names:
            if VARIANT_SEPARATOR in name:
                await client.unload_model(name)
        self._files.pop(models.key, None)


@dataclass
class _Set:
    key: str
    inputs: list[LoraInput]


class VariantManager:
    def __init__(
        self,
        repository: Path,
        text_encoders: tuple[str, ...],
        sources: LoraSources,
        cache: DiskCache,
        serving: Serving,
        metrics: ModelMetrics,
        max_resident: int,
        build_concurrency: int,
        denoiser: str = specs.UNET,
    ) -> None:
        self.repository = repository
        self.base = VariantModels(denoiser, text_encoders)
        self.sources = sources
        self.cache = cache
        self.serving = serving
        self.metrics = metrics
        self.max_resident = max_resident
        self._base_index = BaseIndex(repository)
        self._build_slots = asyncio.Semaphore(build_concurrency)
        self._builds: dict[str, asyncio.Task[VariantRecord]] = {}
        self._in_use: Counter[str] = Counter()
        self._slot_freed = asyncio.Condition()
        self._resident: OrderedDict[str, tuple[VariantModels, asyncio.Task[None]]] = OrderedDict()
        self._serving_lock = asyncio.Lock()  # loads and unloads run in the order they were decided
        self._base_digest: bytes | None = None

    def loaded(self) -> list[VariantModels]:
        """Resident variants, least recently used first."""
        return [models for models, _ in self._resident.values()]

    def in_use(self) -> dict[str, int]:
        return dict(self._in_use)

    def forget_loaded(self) -> None:
        """Triton lost its models (restart): variants must be made resident again on next use."""
        self._resident.clear()
        self.metrics.variants_loaded.set(0)

    def close(self) -> None:
        self.sources.close()

    @contextlib.asynccontextmanager
    async def use(self, loras: Mapping[str, float]) -> AsyncIterator[VariantModels]:
        """The models for ``loras`` (built and made resident as needed), kept while the block runs."""
        if not loras:
            yield self.base
            return
        pinned: list[str] = []
        try:
            lora_set = await self._resolve(loras, pinned)
            if lora_set is None:
                yield self.base
                return
            key = lora_set.key
            async with self._slot(key):
                self.cache.pin(variant_entry(key))  # in the same step as the slot: no await between
                pinned.append(variant_entry(key))
                record = await self._ensure_built(lora_set)
                if not record.files:
                    yield self.base
                    return
                yield await self._ensure_resident(record)
        finally:
            for name in pinned:
                self.cache.unpin(name)

    # --- 1-2. sources and the key -------------------------------------------------------------

    async def _resolve(self, loras: Mapping[str, float], pinned: list[str]) -> _Set | None:
        found: dict[str, tuple[ResolvedLora, float]] = {}
        for lora_id, weight in sorted(loras.items()):
            lora = self.sources.local(lora_id) or self.sources.downloaded(lora_id)
            if lora is None:
                name = download_entry(download_name(lora_id))
                self.cache.pin(name)
                pinned.append(name)
                try:
                    lora = await self.sources.fetch(lora_id, functools.partial(self.cache.reserve, name))
                except BaseException:
                    self.cache.release(name)
                    raise
                self.cache.commit_download(download_name(lora_id))
            elif lora.download:
                name = download_entry(lora.download)
                self.cache.pin(name)
                pinned.append(name)
            if lora.download:
                self.cache.touch(download_entry(lora.download))
            previous = found.get(lora.identity)
            found[lora.identity] = (lora, weight + (previous[1] if previous else 0.0))
        inputs = []
        for lora, weight in (found[i] for i in sorted(found)):
            rounded = round(weight, WEIGHT_DECIMALS)
            if rounded:
                inputs.append(LoraInput(lora.file, shown(lora.lora_id), rounded))
        if not inputs:
            return None
        h = hashlib.sha256(self._base_fingerprints())
        for identity in sorted(found):
            rounded = round(found[identity][1], WEIGHT_DECIMALS)
            if rounded:
                h.update(f"{identity}|{rounded:.{WEIGHT_DECIMALS}f}\n".encode())
        return _Set(h.hexdigest()[:16], inputs)

    def _base_fingerprints(self) -> bytes:
        """The base models' export fingerprints: part of every variant's key, so a re-exported base
        never meets an old variant.  Fixed while this Triton serves the base, so read once."""
        if self._base_digest is None:
            h = hashlib.sha256()
            for name in self.base.names:
                try:
                    h.update((self.repository / name / FINGERPRINT_FILE).read_bytes())
                except OSError:
                    raise InferenceFailed(
                        "LoRA variants are unavailable: MODEL_REPOSITORY does not hold the exported "
                        f"model '{name}' that Triton serves"
                    ) from None
            self._base_digest = h.digest()
        return self._base_digest

    # --- 3. the residency slot ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self, key: str) -> AsyncIterator[None]:
        async with self._slot_freed:
            await self._slot_freed.wait_for(
                lambda: key in self._in_use or len(self._in_use) < self.max_resident
            )
            self._in_use[key] += 1
        try:
            yield
        finally:
            self._in_use[key] -= 1
            if self._in_use[key] <= 0:
                del self._in_use[key]
                async with self._slot_freed:
                    self._slot_freed.notify_all()

    # --- 4. build -----------------------------------------------------------------------------

    async def _ensure_built(self, lora_set: _Set) -> VariantRecord:
        record = self.cache.variant(lora_set.key)
        if record is not None:
            self.cache.touch(variant_entry(lora_set.key))
            return record
        task = self._builds.get(lora_set.key)
        if task is None:
            task = asyncio.create_task(self._build(lora_set))
            self._builds[lora_set.key] = task
            task.add_done_callback(lambda _: self._builds.pop(lora_set.key, None))
        return await asyncio.shield(task)

    async def _build(self, lora_set: _Set) -> VariantRecord:
        key, name = lora_set.key, variant_entry(lora_set.key)
        async with self._build_slots:
            started = time.perf_counter()
            models = self.base.names
            try:
                plan = await asyncio.to_thread(plan_variant, self._base_index, models, lora_set.inputs)
            except LoraError as e:
                raise BadRequest(str(e)) from None
            self.cache.reserve(name, plan.file_bytes_bound())
            try:
                files = await asyncio.to_thread(write_variant, self.repository, key, plan)
                record = self.cache.commit_variant(key, files, plan.described())
            except BaseException:
                self.cache.release(name)
                raise
            finally:
                await asyncio.to_thread(return_free_memory)
        seconds = time.perf_counter() - started
        self.metrics.variant_builds.inc()
        self.metrics.variant_build_seconds.observe(seconds)
        logger.info(
            "built LoRA variant %s in %.2f s (%.1f MB): %s",
            key,
            seconds,
            record.nbytes / 2**20,
            ", ".join(f"{s.lora_id}={s.weight:g}" for s in lora_set.inputs),
        )
        return record

    # --- 5. residency -------------------------------------------------------------------------

    async def _ensure_resident(self, record: VariantRecord) -> VariantModels:
        key = record.key
        if key in self._resident:
            self._resident.move_to_end(key)
            models, loading = self._resident[key]
            await asyncio.shield(loading)
            return models
        # Decided without an await: evict idle variants (least recently used first) so that this one
        # fits, and list it as resident (loading) before anything else can run.
        victims = []
        for other in list(self._resident):
            if len(self._resident) < self.max_resident:
                break
            if not self._in_use[other]:
                victims.append(self._resident.pop(other)[0])
        models = self.serving.models(self.base, record)
        loading = asyncio.create_task(self._load(models, victims))
        self._resident[key] = (models, loading)
        self.metrics.variants_loaded.set(len(self._resident))
        try:
            await asyncio.shield(loading)
        except BaseException:
            if self._resident.get(key, (None, None))[1] is loading:
                del self._resident[key]
                self.metrics.variants_loaded.set(len(self._resident))
            raise
        return models

    async def _load(self, models: VariantModels, victims: list[VariantModels]) -> None:
        """Unload ``victims``, then load ``models``. A load that runs out of GPU memory (the tensorrt
        target allocates each engine's execution contexts at load) evicts the least recently used idle
        variant and retries once; failing again, it leaves nothing of the variant loaded and raises
        :class:`OutOfMemory` (the contract's 500)."""
        async with self._serving_lock:
            for victim in victims:
                await self.serving.unload(victim)
                logger.info("unloaded LoRA variant %s (least recently used)", victim.key)
            try:
                await self.serving.load(models)
                return
            except OutOfMemory:
                spare = self._idle_victim(models.key)
                if spare is None:
                    await self._unload_quietly(models)
                    raise
            logger.warning(
                "out of GPU memory loading LoRA variant %s: unloading idle variant %s and retrying once",
                models.key,
                spare.key,
            )
            await self.serving.unload(spare)
            try:
                await self.serving.load(models)
            except OutOfMemory:
                await self._unload_quietly(models)
                raise

    def _idle_victim(self, loading: str) -> VariantModels | None:
        """The least recently used resident variant that no request uses, other than ``loading``;
        removed from the resident list."""
        for key, (models, task) in self._resident.items():
            if key != loading and not self._in_use[key] and task.done():
                del self._resident[key]
                self.metrics.variants_loaded.set(len(self._resident))
                return models
        return None

    async def _unload_quietly(self, models: VariantModels) -> None:
        """Unload what a failed load left (its text encoder may have loaded before its UNet failed)."""
        try:
            await self.serving.unload(models)
        except Exception as e:  # the model may not be there at all: nothing to free then
            logger.info("unloading what failed to load of LoRA variant %s: %s", models.key, e)
