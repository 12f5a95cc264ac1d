"""The models this service serves, and which of them Triton holds now.

One :class:`ServedEntry` per model of ``MODEL_ID`` / ``MODEL_IDS`` (its description, LoRA variants,
client and, while Triton holds it, its :class:`server.loaded.LoadedModel`).  The
:class:`Registry` decides residency:

- a model loads on first use, through Triton's repository API; concurrent first requests share one
  load, and loads run one at a time, so that each is measured alone;
- what a model takes is measured once it is loaded: on a GPU by Triton's own GPU memory metric before
  and after its load (its LoRA variants' loads added), else by the resident memory of the bundled
  Triton's stubs that serve it (its LoRA variants live in them); with neither (a remote Triton on
  CPU), by the size of its files;
- with ``MODEL_MEMORY_GB`` set, a load that would pass it first unloads the least recently used idle
  model; a model in use (a request holds it from its admission to its answer) is never unloaded, and
  a load that cannot make room waits until a model is idle, within the request's deadline;
- pinned models (``PINNED_MODEL_IDS``) load at start and are never unloaded; pinned models that do
  not fit together are a start-up error naming them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from export.contract.specs import VARIANT_SEPARATOR, VARIANTS_DIR
from server.engines import repository_models
from server.errors import BadRequest, InferenceFailed, ServiceError, ServiceUnavailable, brief
from server.loaded import LoadedModel, ModelDescription, base_models, find_safety_checker, serving_pipeline
from server.metrics import Metrics, ModelMetrics
from server.settings import ServedModel, Settings
from server.triton.backend import TritonBackend
from server.triton.scoped import ModelClient, triton_name

if TYPE_CHECKING:
    from export.models.source import ModelSource
    from server.engines import RepositoryEngines
    from server.pipeline.safety import SafetyChecker
    from server.variants import VariantManager

logger = logging.getLogger(__name__)

# With several models, MODEL_REPOSITORY/<this> is the folder Triton serves them all from.
SERVED_DIR = "served"
GB = 2**30
UNLOAD_WAIT_S = 30.0  # longest wait for an unloaded model's memory to come back


class PinnedOverBudget(RuntimeError):
    """The pinned models do not fit in MODEL_MEMORY_GB together."""


class ServedEntry:
    """One served model: what the API's rules need, and what Triton holds of it."""

    def __init__(self, served: ServedModel, metrics: ModelMetrics, composed: Path | None) -> None:
        self.served = served
        self.metrics = metrics
        self.composed = composed
        self.source: ModelSource | None = None
        self.engines: RepositoryEngines | None = None
        self.description: ModelDescription | None = None
        self.variants: VariantManager | None = None
        self.loaded: LoadedModel | None = None  # while resident and Triton serves it
        self.safety_checker: SafetyChecker | None = None  # kept while the same client is in use
        self.client: ModelClient | None = None
        self.resident = False  # Triton holds its base models
        self.loading: asyncio.Task[None] | None = None
        self.in_use = 0
        self.last_used = 0.0
        self.memory = 0  # bytes, measured at its load; its variants' loads added (GPU)
        self.measured = 0  # what it held when last resident: its need at its next load
        self.suspects: set[str] = set()  # base models a request found not serving
        self._file_bytes: int | None = None
        self._loaded_parts: list[str] | None = None

    @property
    def model_id(self) -> str:
        return self.served.model_id

    @property
    def pinned(self) -> bool:
        return self.served.pinned

    def parts(self) -> list[str]:
        """Its base models by their part names (``unet``, ``vae_decoder``, ...)."""
        return base_models(self.source) if self.source is not None else []

    def triton_names(self) -> list[str]:
        """Its base models as Triton names them (what the health checks ask)."""
        return [triton_name(self.served.alias, m) for m in self.parts()]

    def triton_loaded_names(self) -> list[str]:
        return [triton_name(self.served.alias, m) for m in self.loaded_parts()]

    def loaded_parts(self) -> list[str]:
        """What a load brings in: the repository manifest's models (the safety checker too), else
        the base models (the manifest read once: the unload waits ask it every 50 ms)."""
        if self._loaded_parts is None:
            self._loaded_parts = list(repository_models(self.served.repository.resolve())) or self.parts()
        return self._loaded_parts

    def file_bytes(self) -> int:
        """The size of its Triton models' files: what it is taken to need before its first load
        (read once: they do not change while it is served)."""
        if self._file_bytes is None:
            self._file_bytes = self._sum_file_bytes()
        return self._file_bytes

    def _sum_file_bytes(self) -> int:
        total = 0
        for part in self.loaded_parts():
            folder = self.served.repository / part
            for path in folder.rglob("*"):
                if path.is_file() and VARIANTS_DIR not in path.relative_to(folder).parts[:1]:
                    total += path.stat().st_size
        return total

    def client_for(self, backend: TritonBackend) -> ModelClient:
        """Its view of the backend's client now (a new one when the client changed)."""
        raw = backend.require_client()
        if self.client is None or self.client.client is not raw:
            self.client = ModelClient(raw, self.served.alias, self.served.repository.resolve(), self.composed)
            self.client.meter = backend.gpu_memory_used
        return self.client

    def set_resident(self, resident: bool, memory: int = 0) -> None:
        if not resident:
            self.measured = max(self.measured, self.held_bytes())
            self.loaded = None
            if self.client is not None:
                self.client.variant_bytes.clear()
        self.resident = resident
        self.memory = memory if resident else 0
        self.metrics.resident.set(int(resident))
        self.metrics.memory.set(self.memory)

    def need(self) -> int:
        """What it is taken to need at its next load: what it held when last resident, else its files."""
        return self.measured or self.file_bytes()

    def held_bytes(self) -> int:
        extra = sum(self.client.variant_bytes.values()) if self.client is not None else 0
        return self.memory + extra


class Registry:
    def __init__(self, settings: Settings, backend: TritonBackend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        served = settings.served_models()
        self.composed = settings.model_repository.resolve() / SERVED_DIR if len(served) > 1 else None
        self.entries = {s.model_id: ServedEntry(s, metrics.model(s.model_id), self.composed) for s in served}
        self.budget = int(settings.model_memory_gb * GB)
        metrics.memory_budget.set(self.budget)
        self._room = asyncio.Condition()  # residency decisions, loads and unloads, one at a time

    # --- which model ---------------------------------------------------------------------------

    @property
    def default(self) -> ServedEntry:
        return next(iter(self.entries.values()))

    def entry(self, model_id: str) -> ServedEntry:
        """The model a request's ``model_id`` names: empty is the first; unknown is a 400."""
        if not model_id:
            return self.default
        entry = self.entries.get(model_id)
        if entry is None:
            served = ", ".join(f"'{m}'" for m in self.entries)
            raise BadRequest(f"Model '{brief(model_id)}' is not served here; this service serves {served}.")
        return entry

    def __iter__(self) -> Iterator[ServedEntry]:
        return iter(self.entries.values())

    def resident(self) -> list[ServedEntry]:
        return [e for e in self.entries.values() if e.resident]

    # --- requests ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self, entry: ServedEntry) -> AsyncIterator[None]:
        """The model is in use while the block runs: never unloaded then."""
        entry.in_use += 1
        try:
            yield
        finally:
            entry.in_use -= 1
            entry.last_used = time.monotonic()
            if not entry.in_use:
                async with self._room:
                    self._room.notify_all()

    async def ready(self, entry: ServedEntry) -> LoadedModel:
        """The model loaded in Triton (loading it now, or joining the load under way)."""
        while True:
            if entry.resident and entry.loaded is not None:
                return entry.loaded
            if entry.loading is None:
                entry.loading = asyncio.create_task(
                    self._load(entry, warmup=False), name=f"load {entry.model_id}"
                )
                entry.loading.add_done_callback(lambda _: setattr(entry, "loading", None))
            await asyncio.shield(entry.loading)

    # --- residency -----------------------------------------------------------------------------

    async def load_pinned(self) -> None:
        """Load the pinned models that Triton does not hold (at start, and after Triton restarted)."""
        for entry in self.entries.values():
            if entry.pinned and not entry.resident:
                await self._load(entry, warmup=self.settings.warmup)

    def check_pinned_budget(self) -> None:
        """Raise :class:`PinnedOverBudget` when the pinned models cannot fit together: by their files
        before they load, by what they hold once loaded."""
        if not self.budget:
            return
        pinned = [e for e in self.entries.values() if e.pinned]
        sizes = {e.model_id: (e.held_bytes() if e.resident else e.need()) for e in pinned}
        if sum(sizes.values()) > self.budget:
            listed = ", ".join(f"{m} ({b / GB:.2f} GB)" for m, b in sizes.items())
            raise PinnedOverBudget(
                f"the pinned models (PINNED_MODEL_IDS) need more than MODEL_MEMORY_GB="
                f"{self.settings.model_memory_gb:g} together: {listed}"
            )

    def forget_triton(self) -> None:
        """Triton started again: it holds nothing of ours (the pinned models load again)."""
        for entry in self.entries.values():
            entry.set_resident(False)
            if entry.variants is not None:
                entry.variants.forget_loaded()

    def exclusive(self) -> asyncio.Condition:
        """Held, no model loads or unloads (the supervisor's health check holds it)."""
        return self._room

    def forget_variants(self) -> None:
        """Triton may have lost the LoRA variants' models (it stopped answering)."""
        for entry in self.entries.values():
            if entry.variants is not None:
                entry.variants.forget_loaded()

    async def measure_started(self, entry: ServedEntry, gpu_before: int | None) -> int:
        """What ``entry`` holds in a Triton that loaded it at its start (``gpu_before``: NVML's
        reading before that start)."""
        return await self._measure(entry, gpu_before)

    def mark_started(self, entry: ServedEntry, memory: int, seconds: float) -> None:
        """A new Triton loaded ``entry`` at its start (one model, MODEL_ID): it is resident."""
        entry.set_resident(True, memory)
        entry.metrics.loads.inc()
        entry.metrics.load_seconds.observe(seconds)

    def _used(self, besides: ServedEntry) -> int:
        return sum(e.held_bytes() for e in self.entries.values() if e.resident and e is not besides)

    def _need(self, entry: ServedEntry) -> int:
        """What a load of ``entry`` is taken to need: what it held when last resident; never measured,
        its files but at least the most any model was measured at (the files say nothing of a
        python-backend stub's own memory, nor of a TensorRT engine's activations)."""
        if entry.measured:
            return entry.measured
        measured = [max(e.measured, e.held_bytes()) for e in self.entries.values()]
        return max([entry.file_bytes(), *measured])

    def _victim(self, besides: ServedEntry) -> ServedEntry | None:
        """The least recently used resident model that is idle and not pinned."""
        idle = [
            e
            for e in self.entries.values()
            if e.resident and not e.pinned and not e.in_use and e is not besides and e.loading is None
        ]
        return min(idle, key=lambda e: e.last_used, default=None)

    async def _load(self, entry: ServedEntry, warmup: bool) -> None:
        async with self._room:
            if entry.resident and entry.loaded is not None:
                return
            await self._make_room(entry)
            started = time.perf_counter()
            client = entry.client_for(self.backend)
            if not entry.resident:
                before = await self.backend.gpu_memory_used()
                await self._load_parts(entry, client)
                entry.set_resident(True, await self._measure(entry, before))
                entry.metrics.loads.inc()
            await self.serve(entry, client, warmup)
            seconds = time.perf_counter() - started
            entry.metrics.load_seconds.observe(seconds)
            logger.info(
                "model %s loaded in %.2f s (%.2f GB; resident: %s)",
                entry.model_id,
                seconds,
                entry.held_bytes() / GB,
                ", ".join(e.model_id for e in self.resident()),
            )
            if self.budget and self._used(entry) + entry.held_bytes() > self.budget:
                await self._make_room(entry, loaded=True)

    async def _make_room(self, entry: ServedEntry, loaded: bool = False) -> None:
        """Unload idle models, least recently used first, until ``entry`` fits in the budget; wait
        while the models that would have to go are in use.  ``loaded``: ``entry`` is in already
        (measured above what its files said) and only idle models leave, without waiting."""
        if not self.budget:
            return
        for other in self.resident():
            await self.refresh_memory(other)
        pinned = sum(e.held_bytes() if e.resident else e.need() for e in self.entries.values() if e.pinned)
        while True:
            need = entry.held_bytes() if entry.resident else self._need(entry)
            if need + (0 if entry.pinned else pinned) > self.budget:
                raise InferenceFailed(
                    f"model '{entry.model_id}' needs {need / GB:.2f} GB, more than MODEL_MEMORY_GB="
                    f"{self.settings.model_memory_gb:g} leaves beside the pinned models "
                    f"({pinned / GB:.2f} GB)"
                )
            if self._used(entry) + need <= self.budget:
                return
            victim = self._victim(entry)
            if victim is not None:
                await self._unload(victim)
            elif loaded:
                logger.warning(
                    "model %s is over MODEL_MEMORY_GB with every other model in use", entry.model_id
                )
                return
            else:
                await self._room.wait()  # until a model is idle

    async def _load_parts(self, entry: ServedEntry, client: ModelClient) -> None:
        try:
            async with asyncio.timeout(self.settings.startup_timeout_s):
                # one model's parts load side by side (Triton's model-load threads)
                await asyncio.gather(*(client.load_model(part) for part in entry.loaded_parts()))
        except (ServiceError, TimeoutError) as e:
            reason = (
                e.message
                if isinstance(e, ServiceError)
                else f"timed out after {self.settings.startup_timeout_s:g} s"
            )
            await self._unload_parts(entry, client)
            raise ServiceUnavailable(
                f"The service could not load model '{entry.model_id}': {reason}", reason="not_loaded"
            ) from e

    async def _measure(self, entry: ServedEntry, gpu_before: int | None) -> int:
        gpu_after = await self.backend.gpu_memory_used() if gpu_before is not None else None
        if gpu_before is not None and gpu_after is not None:
            return max(0, gpu_after - gpu_before)
        stubs = await self.backend.stub_memory(entry.triton_loaded_names())
        return stubs if stubs else await asyncio.to_thread(entry.file_bytes)

    async def refresh_memory(self, entry: ServedEntry) -> None:
        """Read again what a resident model holds where it can be read at any time (the bundled
        Triton's stubs on CPU: its LoRA variants' overrides grow it)."""
        if entry.resident and await self.backend.gpu_memory_used() is None:
            stubs = await self.backend.stub_memory(entry.triton_loaded_names())
            if stubs:
                entry.memory = stubs
                entry.metrics.memory.set(stubs)

    async def serve(self, entry: ServedEntry, client: ModelClient, warmup: bool) -> None:
        """Its pipeline and safety checker over ``client`` (warmed up when ``warmup``)."""
        assert entry.description is not None and entry.variants is not None and entry.source is not None
        entry.safety_checker = await find_safety_checker(
            self.settings, entry.served.repository, entry.source, client, entry.safety_checker
        )
        pipeline = await serving_pipeline(entry.description, client, warmup)
        entry.loaded = LoadedModel(entry.description, entry.variants, pipeline, entry.safety_checker)

    async def update_safety_checker(self, entry: ServedEntry, client: ModelClient) -> None:
        """The safety checker again (SAFETY_CHECKER, or Triton's safety_checker model, changed)."""
        assert entry.source is not None
        entry.safety_checker = await find_safety_checker(
            self.settings, entry.served.repository, entry.source, client, entry.safety_checker
        )
        if entry.loaded is not None and entry.loaded.safety_checker is not entry.safety_checker:
            entry.loaded = dataclasses.replace(entry.loaded, safety_checker=entry.safety_checker)

    async def _unload(self, entry: ServedEntry) -> None:
        """Unload an idle model (and its LoRA variants' own Triton models): decided, and the entry
        marked, before the first await."""
        held = entry.held_bytes()
        client = entry.client
        variants = entry.variants.loaded() if entry.variants is not None else []
        entry.set_resident(False)
        entry.metrics.evictions.inc()
        if entry.variants is not None:
            entry.variants.forget_loaded()
        if client is not None:
            for models in variants:
                for name in models.names:
                    if VARIANT_SEPARATOR in name:
                        with contextlib.suppress(ServiceError):
                            await client.unload_model(name)
            await self._unload_parts(entry, client)
        logger.info("model %s unloaded (least recently used; %.2f GB freed)", entry.model_id, held / GB)

    async def _unload_parts(self, entry: ServedEntry, client: ModelClient) -> None:
        """Unload its Triton models and wait until they are gone (Triton unloads in the background:
        the next load is measured only once this one's memory is back)."""
        parts = entry.loaded_parts()
        for part in parts:
            try:
                await client.unload_model(part)
            except ServiceError as e:
                logger.warning("unloading %s of model %s: %s", part, entry.model_id, e.message)
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while time.monotonic() < deadline:
            try:
                ready = [p for p in parts if await client.model_ready(p)]
            except ServiceError:
                return  # Triton is gone: nothing of it is left either
            if not ready and not await self.backend.stub_memory(entry.triton_loaded_names()):
                return
            await asyncio.sleep(0.05)
        logger.warning("model %s still holds memory %g s after its unload", entry.model_id, UNLOAD_WAIT_S)
