"""The service's status, and the start-up, health checks, restarts and reloads that decide it.

Start-up runs in the background so ``/health`` answers ``LOADING`` at once: resolve the model's configs,
start the bundled Triton when no ``TRITON_URL`` is set and, while it starts, import the serving code
(torch, diffusers, transformers: seconds) and load the model's tokenizers and scheduler in a worker
thread; wait for every model to be ready, then run one warm-up generation.  Only then is the status
``OK`` (``IDLE`` on ``/health`` when no request runs or waits).  A request that arrives while the
service loads waits for it within its deadline.  Until the service has served once, a problem it can
recover from (Triton not up yet) keeps it ``LOADING``: go-livepeer registers an external runner at the
first ``/health`` that is not ``ERROR`` and gives up for good at an ``ERROR``.  This module imports
none of that code itself, so the service starts listening at once.

The supervisor is handed its back end (:class:`server.triton.backend.TritonBackend`) and keeps the
:class:`server.registry.Registry` of the served models: ``await wait_description(entry)`` for the
API's rules of one model, and ``await ready_model(entry)`` for the
:class:`server.loaded.LoadedModel` a request runs on (loaded then when it is not resident).  With
several models the pinned ones (``PINNED_MODEL_IDS``) load at start, one at a time, each measured;
only then is the status ``OK``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time

from server import hardware
from server.engines import repository_models
from server.errors import ModelUnavailable, ServiceError, ServiceUnavailable, TritonUnavailable
from server.loaded import LoadedModel, ModelDescription, load_model, lora_models, open_repository
from server.metrics import Metrics
from server.registry import PinnedOverBudget, Registry, ServedEntry
from server.settings import Settings
from server.triton.backend import TritonBackend, tritonserver_environment
from server.triton.scoped import compose_repository, triton_name

logger = logging.getLogger(__name__)


class Health(enum.StrEnum):
    LOADING = "LOADING"
    OK = "OK"
    ERROR = "ERROR"
    IDLE = "IDLE"


class Supervisor:
    """Keeps the back end serving and hands the service its models.

    A supervisor task checks Triton every ``health_interval_s``: while it (or one of the resident
    models) is unreachable after the service has served, the status is ``ERROR`` and generations are
    refused at once; a bundled Triton that died is started again, and a base model that stopped
    serving (not ready, its python-backend stub gone, or a request told so) is loaded again through
    the repository API.  Once every pinned model answers and has warmed up, the status is ``OK``.
    One failed call (a deadline, a variant that is not loaded) changes nothing here: only Triton or a
    base model gone is ``ERROR``.
    """

    def __init__(self, settings: Settings, backend: TritonBackend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.registry = Registry(settings, backend, metrics)
        self.status = Health.LOADING
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Set (and replaced) at every change of ``status`` or of a description: what requests wait on.
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()

    @property
    def description(self) -> ModelDescription | None:
        """The default model's description (``None`` until known)."""
        return self.registry.default.description

    def _refusal(self, entry: ServedEntry | None = None) -> ServiceUnavailable:
        """Why a request cannot be served now (the status is not ``OK``)."""
        model_id = (entry or self.registry.default).model_id
        if self.status is Health.ERROR and not self._ready.is_set():
            return ServiceUnavailable(
                f"The service could not load model '{model_id}'; see its log.", reason="not_loaded"
            )
        if self.status is Health.ERROR:
            return TritonUnavailable("The inference server is unavailable; try again shortly.")
        return ServiceUnavailable(
            "The service is still loading the model; try again shortly.", reason="loading"
        )

    async def wait_description(self, entry: ServedEntry | None = None) -> ModelDescription:
        """A model's description, waiting while the service loads it (refused at ``ERROR``)."""
        entry = entry or self.registry.default
        while entry.description is None:
            await self._wait_loading(entry)
        return entry.description

    async def ready_model(self, entry: ServedEntry | None = None) -> LoadedModel:
        """A model once the service serves (``OK``), loaded into Triton when it is not resident: wait
        while the service starts, refused at ``ERROR`` with the reason (:class:`ServiceUnavailable`;
        :class:`TritonUnavailable` after it has served)."""
        entry = entry or self.registry.default
        while True:
            if self.status is Health.OK:
                if entry.resident and entry.loaded is not None:
                    return entry.loaded
                try:
                    return await self.registry.ready(entry)
                except ServiceError as e:
                    self.report_failure(e)
                    raise
            await self._wait_loading(entry)

    async def _wait_loading(self, entry: ServedEntry) -> None:
        if self.status is Health.ERROR:
            raise self._refusal(entry)
        await self._changed.wait()

    def _set_status(self, status: Health, error: str | None) -> None:
        changed = (status, error) != (self.status, self.error)
        self.status, self.error = status, error
        if changed:
            self._notify()

    def _notify(self) -> None:
        """Wake the requests that wait for the service."""
        self._changed.set()
        self._changed = asyncio.Event()

    def report_failure(self, error: ServiceError) -> None:
        """A request's call failed: Triton gone is ERROR now; a base model not serving (or a failure
        that could mean so) has the supervisor check at once.  Anything else concerns that request."""
        if isinstance(error, TritonUnavailable):
            self._fail(error.message)
            self._wake.set()
        elif isinstance(error, ModelUnavailable):
            for entry in self.registry.resident():
                if error.model in entry.triton_names():
                    entry.suspects.add(error.model)
                    self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="t2i-supervisor")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.backend.close()
        for entry in self.registry:
            if entry.variants is not None:
                entry.variants.close()

    async def _supervise(self) -> None:
        started = time.perf_counter()
        entries = list(self.registry)
        for entry in entries:
            try:
                entry.source, entry.engines = await asyncio.to_thread(
                    open_repository, self.settings, entry.served
                )
            except Exception as e:
                self._fail(f"cannot load model '{entry.model_id}': {e}", permanent=True)
                return
        try:
            self.registry.check_pinned_budget()
            if self.registry.composed is not None:
                served = [(e.served.alias, e.served.repository) for e in entries]
                await asyncio.to_thread(compose_repository, self.registry.composed, served)
        except (PinnedOverBudget, OSError) as e:
            self._fail(f"cannot start: {e}", permanent=True)
            return
        # The bundled Triton starts while the serving code and the models load in a worker thread.
        connected, *loaded = await asyncio.gather(
            self._connect(),
            *(asyncio.to_thread(self._load_description, entry) for entry in entries),
            return_exceptions=True,
        )
        for entry, result in zip(entries, loaded, strict=True):
            if isinstance(result, BaseException):
                self._fail(f"cannot load model '{entry.model_id}': {result}", permanent=True)
                await self.backend.stop()  # nothing will use it
                return
        self._notify()  # requests waiting for the models' descriptions
        if isinstance(connected, BaseException):
            self._fail(str(connected) or type(connected).__name__)
            await self._rest()
        while True:
            try:
                await self._check()
                if self.status is not Health.OK:
                    logger.info("serving (%.1f s after start)", time.perf_counter() - started)
                self._ready.set()
                self._set_status(Health.OK, None)
            except asyncio.CancelledError:
                raise
            except PinnedOverBudget as e:
                self._fail(f"cannot start: {e}", permanent=True)
                return
            except Exception as e:
                self._fail(str(e) or type(e).__name__)
            await self._rest()

    def _load_description(self, entry: ServedEntry) -> None:
        """A model's tokenizers, scheduler and LoRA variants (a worker thread)."""
        assert entry.source is not None and entry.engines is not None
        model, entry.variants = load_model(
            self.settings,
            entry.served,
            entry.source,
            lambda: entry.client_for(self.backend),
            entry.metrics,
        )
        entry.description = ModelDescription(model, entry.engines)

    async def _rest(self) -> None:
        """Until the next check: ``health_interval_s``, or sooner when a request reports a failure."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.health_interval_s)

    def _fail(self, reason: str, permanent: bool = False) -> None:
        """``ERROR`` for ``reason``; but ``LOADING`` while the service has not served yet and can still
        get there (go-livepeer gives up on a runner that says ``ERROR`` at its start)."""
        status = Health.ERROR if permanent or self._ready.is_set() else Health.LOADING
        if self.status is not status or self.error != reason:
            logger.error(
                "%s: %s%s",
                "unhealthy" if status is Health.ERROR else "not ready yet",
                reason,
                " (not retrying)" if permanent else "",
            )
        for entry in self.registry:
            entry.loaded = None
        self._set_status(status, reason)

    async def _check(self) -> None:
        """Raise unless Triton and every resident model answer; (re)start the bundled Triton, reload a
        base model that stopped serving, load the pinned models, and warm up as needed."""
        await self._connect()
        # Between the registry's loads and unloads: a model being loaded or unloaded is not broken.
        async with self.registry.exclusive():
            resident = self.registry.resident()
            suspects: set[str] = set()
            for entry in resident:
                suspects |= entry.suspects
                entry.suspects = set()
            try:
                broken = await self.backend.check_health(
                    [n for e in resident for n in e.triton_names()], suspects
                )
            except TritonUnavailable:
                for entry in resident:
                    entry.suspects |= suspects & set(entry.triton_names())
                self.registry.forget_variants()  # when it answers again it may be a new server
                raise
            if broken:
                self._fail(
                    f"Triton at {self.backend.url} does not serve {', '.join(broken)}; loading it again"
                )
                await self.backend.reload(broken)
            await self.backend.remove_orphaned_regions()  # of stubs that were killed
            for entry in self.registry.resident():
                client = entry.client_for(self.backend)
                if entry.loaded is None:
                    await self.registry.serve(entry, client, warmup=self.settings.warmup)
                    self._notify()  # requests waiting for the model
                else:
                    await self.registry.update_safety_checker(entry, client)
        await self.registry.load_pinned()
        self.registry.check_pinned_budget()

    async def _connect(self) -> None:
        """Connect the back end; before a new server starts, forget what the old one served."""
        if self.backend.connected:
            return
        if self._ready.is_set():  # the bundled Triton exited after serving: ERROR while it starts again
            self._fail("the bundled Triton exited; starting it again")
        self.registry.forget_triton()
        entries = list(self.registry)
        scale = max(e.source.vae_scale_factor for e in entries if e.source is not None)
        lora = [
            triton_name(e.served.alias, m)
            for e in entries
            if e.source is not None
            for m in lora_models(e.source)
        ]
        environment = tritonserver_environment(self.settings, scale, lora)
        if self.registry.composed is None:  # one model: its repository as it is, its models at start
            entry = self.registry.default
            gpu_before = hardware.gpu_memory_used()
            started = time.perf_counter()
            await self.backend.connect(environment, repository_models(entry.served.repository.resolve()))
            memory = await self.registry.measure_started(entry, gpu_before)
            self.registry.mark_started(entry, memory, time.perf_counter() - started)
        else:  # several: Triton starts with none; the pinned ones load one by one, each measured
            await self.backend.connect(environment, (), self.registry.composed, load_all=False)
