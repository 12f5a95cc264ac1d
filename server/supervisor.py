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

The supervisor is handed its back end (:class:`server.triton.backend.TritonBackend`) and hands the
service the model: :attr:`Supervisor.description` (``None`` until known) for the API's rules, and
``await ready_model()`` for the :class:`server.loaded.LoadedModel` a request runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from typing import TYPE_CHECKING

from server.engines import repository_models
from server.errors import ModelUnavailable, ServiceError, ServiceUnavailable, TritonUnavailable
from server.loaded import (
    LoadedModel,
    ModelDescription,
    base_models,
    find_safety_checker,
    load_model,
    lora_models,
    open_repository,
    serving_pipeline,
)
from server.metrics import Metrics
from server.settings import Settings
from server.triton.backend import TritonBackend, tritonserver_environment

if TYPE_CHECKING:
    from export.models.source import ModelSource
    from server.pipeline.safety import SafetyChecker
    from server.variants import VariantManager

logger = logging.getLogger(__name__)


class Health(enum.StrEnum):
    LOADING = "LOADING"
    OK = "OK"
    ERROR = "ERROR"
    IDLE = "IDLE"


class Supervisor:
    """Keeps the back end serving and hands the service its model.

    A supervisor task checks Triton every ``health_interval_s``: while it (or one of the models) is
    unreachable after the service has served, the status is ``ERROR`` and generations are refused at
    once; a bundled Triton that died is started again, and a base model that stopped serving (not
    ready, its python-backend stub gone, or a request told so) is loaded again through the repository
    API.  Once every model answers and a warm-up generation has run, the status is ``OK``.  One failed
    call (a deadline, a variant that is not loaded) changes nothing here: only Triton or a base model
    gone is ``ERROR``.
    """

    def __init__(self, settings: Settings, backend: TritonBackend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.status = Health.LOADING
        self.error: str | None = None
        # What the API's rules need, once the model is loaded (before Triton serves it).
        self.description: ModelDescription | None = None
        # The model as requests use it, while Triton serves it (None while it does not).
        self.loaded: LoadedModel | None = None
        self._source: ModelSource | None = None
        self._variants: VariantManager | None = None
        self._safety_checker: SafetyChecker | None = None  # kept while the same client is in use
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Set (and replaced) at every change of ``status``: what waiting requests wait on.
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        # Base models a request found not serving; the supervisor loads them again.
        self._suspects: set[str] = set()

    def _refusal(self) -> ServiceUnavailable:
        """Why a request cannot be served now (the status is not ``OK``)."""
        if self.status is Health.ERROR and not self._ready.is_set():
            return ServiceUnavailable(
                f"The service could not load model '{self.settings.model_id}'; see its log.",
                reason="not_loaded",
            )
        if self.status is Health.ERROR:
            return TritonUnavailable("The inference server is unavailable; try again shortly.")
        return ServiceUnavailable(
            "The service is still loading the model; try again shortly.", reason="loading"
        )

    async def wait_description(self) -> ModelDescription:
        """The model's description, waiting while the service loads it (refused at ``ERROR``)."""
        while self.description is None:
            await self._wait_loading()
        return self.description

    async def ready_model(self) -> LoadedModel:
        """The model once the service serves (``OK``): wait while it loads, refused at ``ERROR`` with
        the reason (:class:`ServiceUnavailable`; :class:`TritonUnavailable` after it has served)."""
        while True:
            loaded = self.loaded
            if self.status is Health.OK and loaded is not None:
                return loaded
            await self._wait_loading()

    async def _wait_loading(self) -> None:
        if self.status is Health.ERROR:
            raise self._refusal()
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
        elif isinstance(error, ModelUnavailable) and error.model in self._base_models():
            self._suspects.add(error.model)
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="t2i-supervisor")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.backend.close()
        if self._variants is not None:
            self._variants.close()

    async def _supervise(self) -> None:
        started = time.perf_counter()
        try:
            source, engines = await asyncio.to_thread(open_repository, self.settings)
        except Exception as e:
            self._fail(f"cannot load model '{self.settings.model_id}': {e}", permanent=True)
            return
        self._source = source
        # The bundled Triton starts while the serving code and the model load in a worker thread.
        connected, loaded = await asyncio.gather(
            self._connect(),
            asyncio.to_thread(load_model, self.settings, source, self.backend.require_client, self.metrics),
            return_exceptions=True,
        )
        if isinstance(loaded, BaseException):
            self._fail(f"cannot load model '{self.settings.model_id}': {loaded}", permanent=True)
            await self.backend.stop()  # nothing will use it
            return
        model, self._variants = loaded
        self.description = ModelDescription(model, engines)
        self._notify()  # requests waiting for the model's description
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
            except Exception as e:
                self._fail(str(e) or type(e).__name__)
            await self._rest()

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
        self.loaded = None
        self._set_status(status, reason)

    def _forget_variants(self) -> None:
        if self._variants is not None:
            self._variants.forget_loaded()  # a restarted Triton holds only the base models

    def _base_models(self) -> list[str]:
        return base_models(self._source) if self._source is not None else []

    async def _check(self) -> None:
        """Raise unless Triton and every model answer; (re)start the bundled Triton, reload a base model
        that stopped serving, and warm up as needed."""
        assert self.description is not None and self._variants is not None and self._source is not None
        await self._connect()
        suspects, self._suspects = self._suspects, set()
        try:
            broken = await self.backend.check_health(self._base_models(), suspects)
        except TritonUnavailable:
            self._suspects |= suspects
            self._forget_variants()  # when it answers again it may be a new server
            raise
        if broken:
            self._fail(f"Triton at {self.backend.url} does not serve {', '.join(broken)}; loading it again")
            await self.backend.reload(broken)
        await self.backend.remove_orphaned_regions()  # of stubs that were killed
        client = self.backend.require_client()
        self._safety_checker = await find_safety_checker(
            self.settings, self._source, client, self._safety_checker
        )
        if self.loaded is None:
            pipeline = await serving_pipeline(self.settings, self.description, client)
            self.loaded = LoadedModel(self.description, self._variants, pipeline, self._safety_checker)
            self._notify()  # requests waiting for the model
        elif self.loaded.safety_checker is not self._safety_checker:
            self.loaded = dataclasses.replace(self.loaded, safety_checker=self._safety_checker)

    async def _connect(self) -> None:
        """Connect the back end; before a new server starts, forget what the old one served."""
        assert self._source is not None
        if self.backend.connected:
            return
        if self._ready.is_set():  # the bundled Triton exited after serving: ERROR while it starts again
            self._fail("the bundled Triton exited; starting it again")
        self.loaded = None
        self._forget_variants()
        environment = tritonserver_environment(
            self.settings, self._source.vae_scale_factor, lora_models(self._source)
        )
        await self.backend.connect(environment, repository_models(self.settings.model_repository.resolve()))
