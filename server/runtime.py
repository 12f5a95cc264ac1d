"""What the service runs on: the Triton server (bundled or remote), its client, the loaded model.

Start-up runs in the background so ``/health`` answers ``LOADING`` at once: resolve the model's configs,
start the bundled Triton when no ``TRITON_URL`` is set and, while it starts, import the serving code
(torch, diffusers, transformers: seconds) and load the model's tokenizers and scheduler in a worker
thread; wait for every model to be ready, then run one warm-up generation.  Only then is the status
``OK`` (``IDLE`` on ``/health`` when no request runs or waits).  A request that arrives while the
service loads waits for it within its deadline.  Until the service has served once, a problem it can
recover from (Triton not up yet) keeps it ``LOADING``: go-livepeer registers an external runner at the
first ``/health`` that is not ``ERROR`` and gives up for good at an ``ERROR``.  This module imports
none of that code itself, so the service starts listening at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from export.contract import specs
from export.contract.specs import MANIFEST_FILE
from export.models.lora import ONNX_PREFIXES
from export.models.source import ModelSource, resolve_model
from server.engines import (
    RepositoryEngines,
    check_engine_host,
    read_repository,
    require_exported,
    running_hosts,
)
from server.errors import ModelUnavailable, ServiceError, ServiceUnavailable, TritonUnavailable
from server.metrics import Metrics
from server.pipeline.request import GenerationRequest
from server.pipeline.rules import rule_for
from server.settings import Settings
from server.triton.client import TritonClient
from server.triton.launcher import BundledTriton, TritonLaunchConfig, system_tritonserver

if TYPE_CHECKING:  # loaded by Runtime._load_model, beside Triton's start
    from server.pipeline.generate import TextToImagePipeline
    from server.pipeline.model import DiffusionModel
    from server.pipeline.safety import SafetyChecker
    from server.variants import VariantManager

logger = logging.getLogger(__name__)


class Health(enum.StrEnum):
    LOADING = "LOADING"
    OK = "OK"
    ERROR = "ERROR"
    IDLE = "IDLE"


class Runtime:
    """Owns the Triton connection and keeps it healthy.

    A supervisor task checks Triton every ``health_interval_s``: while it (or one of the models) is
    unreachable after the service has served, the status is ``ERROR`` and generations are refused at
    once; a bundled Triton that died is
    started again, and a base model that stopped serving (not ready, its python-backend stub gone, or
    a request told so) is loaded again through the repository API.  Once every model answers and a
    warm-up generation has run, the status is ``OK``.  One failed call (a deadline, a variant that is
    not loaded) changes nothing here: only Triton or a base model gone is ``ERROR``.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = Health.LOADING
        self.error: str | None = None
        self.triton: BundledTriton | None = None
        self.client: TritonClient | None = None
        self.source: ModelSource | None = None
        self.model: DiffusionModel | None = None
        self._pipeline: TextToImagePipeline | None = None
        self.safety_checker: SafetyChecker | None = None
        # The repository's TensorRT buckets and build host (empty for the python targets).
        self.engines = RepositoryEngines()
        self._variants: VariantManager | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Set (and replaced) at every change of ``status``: what waiting requests wait on.
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        # Base models a request found not serving; the supervisor loads them again.
        self._suspects: set[str] = set()

    @property
    def pipeline(self) -> TextToImagePipeline:
        if self._pipeline is None or self.status is not Health.OK:
            raise self._refusal()
        return self._pipeline

    def require_model(self) -> DiffusionModel:
        """The model's description (tokenizers, VAE scale); available before Triton is."""
        if self.model is None:
            raise self._refusal()
        return self.model

    @property
    def variants(self) -> VariantManager:
        if self._variants is None:
            raise self._refusal()
        return self._variants

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

    async def wait_model(self) -> DiffusionModel:
        """The model's description, waiting while the service loads it (refused at ``ERROR``)."""
        while self.model is None:
            await self._wait_loading()
        return self.model

    async def wait_serving(self) -> None:
        """Return once the service serves (``OK``): wait while it loads, refuse at ``ERROR``."""
        while self.status is not Health.OK or self._pipeline is None:
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

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)
        if self._variants is not None:
            self._variants.close()

    async def _supervise(self) -> None:
        started = time.perf_counter()
        try:
            source, self.engines = await asyncio.to_thread(self._open_repository)
        except Exception as e:
            self._fail(f"cannot load model '{self.settings.model_id}': {e}", permanent=True)
            return
        self.source = source
        # The bundled Triton starts while the serving code and the model load in a worker thread.
        connected, loaded = await asyncio.gather(
            self._connect(), asyncio.to_thread(self._load_model, source), return_exceptions=True
        )
        if isinstance(loaded, BaseException):
            self._fail(f"cannot load model '{self.settings.model_id}': {loaded}", permanent=True)
            if self.triton is not None:
                await asyncio.to_thread(self.triton.stop)  # nothing will use it
            return
        self.model, self._variants = loaded
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

    def _open_repository(self) -> tuple[ModelSource, RepositoryEngines]:
        """The model's folder (configs only) and the repository's engines, checked against this host."""
        path = resolve_model(self.settings.model_id, weights=False, cache_dir=self.settings.model_dir)
        repository = self.settings.model_repository.resolve()
        running = running_hosts()
        if not self.settings.triton_url:
            require_exported(repository, self.settings.model_id, gpu=bool(running))
        engines = read_repository(repository)
        check_engine_host(engines, running, repository, self.settings.model_id)
        return ModelSource(path), engines

    def _load_model(self, source: ModelSource) -> tuple[DiffusionModel, VariantManager]:
        """The model's tokenizers and scheduler, and its LoRA variants (a worker thread).  The serving
        code is imported here, not at module level: torch and diffusers take seconds."""
        import torch

        from server.pipeline import flow, safety  # noqa: F401 - the pipeline's modules, loaded here
        from server.pipeline.model import DiffusionModel
        from server.variants.setup import variant_manager

        torch.set_num_threads(self.settings.torch_threads)  # a setting of the process, not the thread
        model = DiffusionModel(
            source, self.settings.scheduler, rule_for(self.settings.model_id), self.settings.model_repository
        )
        variants = variant_manager(
            self.settings, source.text_encoders, self._require_client, self.metrics, source.denoiser
        )
        return model, variants

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
        self._pipeline = None
        self._set_status(status, reason)

    def _forget_variants(self) -> None:
        if self._variants is not None:
            self._variants.forget_loaded()  # a restarted Triton holds only the base models

    def _base_models(self) -> list[str]:
        if self.source is None:
            return []
        return [self.source.denoiser, specs.VAE_DECODER, *self.source.text_encoders]

    async def _check(self) -> None:
        """Raise unless Triton and every model answer; (re)start the bundled Triton, reload a base model
        that stopped serving, and warm up as needed."""
        assert self.model is not None
        await self._connect()
        assert self.client is not None
        reason = await self.client.not_live()
        if reason:
            self._forget_variants()  # when it answers again it may be a new server
            raise TritonUnavailable(f"Triton at {self.client.url} is not reachable: {reason}")
        names = self._base_models()
        broken = await self._not_serving(names)
        if broken:
            await self._reload(broken)
        if self.triton is not None:
            await asyncio.to_thread(self.triton.remove_orphaned_regions)  # of stubs that were killed
        self.safety_checker = await self._safety_checker()
        if self._pipeline is None:
            from server.pipeline.flow import pipeline_for  # loaded by _load_model

            pipeline = pipeline_for(self.model, self.client)
            if self.settings.warmup:
                await pipeline(_warmup_request(self.model, self.engines))
            self._pipeline = pipeline

    async def _not_serving(self, names: list[str]) -> list[str]:
        """The base models that do not serve: not ready, a request found them broken, or (bundled
        Triton) a python-backend model without a live stub, which Triton itself does not notice."""
        assert self.client is not None
        stubs = await asyncio.to_thread(self.triton.model_stubs) if self.triton is not None else None
        suspects, self._suspects = self._suspects, set()
        broken = []
        for name in names:
            ready = await self.client.model_ready(name)
            if ready and stubs is None:
                ready = name not in suspects  # a remote Triton: what a request found is all we know
            elif ready and stubs is not None and not stubs.get(name):  # the bundled one: its stubs tell
                ready = await self.client.backend(name) != "python"
            if not ready:
                broken.append(name)
        return broken

    async def _reload(self, names: list[str]) -> None:
        """ERROR while the base models ``names`` load again; raise if they do not come back."""
        assert self.client is not None
        self._fail(f"Triton at {self.client.url} does not serve {', '.join(names)}; loading it again")
        for name in names:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.startup_timeout_s):
                    # Loading a model whose files did not change is a no-op for Triton (its dead stub
                    # stays): unload it first, so it really loads again.
                    await self.client.unload_model(name)
                    await self.client.load_model(name)
            except (ServiceError, TimeoutError) as e:
                reason = e.message if isinstance(e, ServiceError) else "timed out"
                if self.triton is not None:
                    # A bundled Triton that cannot load it again is restarted on the next check.
                    logger.error("model %s could not be loaded again (%s): restarting Triton", name, reason)
                    await asyncio.to_thread(self.triton.stop)
                raise ServiceUnavailable(f"model '{name}' could not be loaded again: {reason}") from e
            logger.warning("model %s loaded again in %.1f s", name, time.perf_counter() - started)
        missing = [n for n in names if not await self.client.model_ready(n)]
        if missing:
            raise ServiceUnavailable(f"Triton at {self.client.url} has not loaded: {', '.join(missing)}")

    def _lora_models(self) -> list[str]:
        """The base models a LoRA can change (the denoiser and the CLIP text encoders)."""
        assert self.source is not None
        return [m for m in (self.source.denoiser, *self.source.text_encoders) if m in ONNX_PREFIXES]

    def _require_client(self) -> TritonClient:
        if self.client is None:
            raise ServiceUnavailable("The inference server is unavailable; try again shortly.")
        return self.client

    async def _safety_checker(self) -> SafetyChecker | None:
        """The checker when enabled and Triton serves one; kept while the same client is in use."""
        assert self.client is not None and self.source is not None
        if self.settings.safety_checker == "off" or not await self.client.model_ready(specs.SAFETY_CHECKER):
            return None
        if self.safety_checker is not None and self.safety_checker.client is self.client:
            return self.safety_checker
        from server.pipeline.safety import SafetyChecker  # loaded by _load_model

        folders = (
            self.source.path / "feature_extractor",
            self.settings.model_repository / specs.SAFETY_CHECKER / "feature_extractor",
        )
        return await asyncio.to_thread(SafetyChecker.from_folders, self.client, *folders)

    async def _connect(self) -> None:
        assert self.source is not None
        if self.settings.triton_url:
            if self.client is None:
                self.client = TritonClient(
                    self.settings.triton_url,
                    self.settings.triton_timeout_s,
                    share_inputs=self.settings.triton_shared_memory,
                )
            return
        if self.triton is not None and self.triton.is_running():
            return
        if self.triton is not None:
            logger.warning("the bundled Triton exited; starting it again (log: %s)", self.triton.log_path)
            await asyncio.to_thread(self.triton.stop)
        if self.client is not None:
            await self.client.close()
            self.client = None
        self._pipeline = None
        self._forget_variants()
        repository = self.settings.model_repository.resolve()
        config = TritonLaunchConfig(
            model_repository=repository,
            state_dir=self.settings.state_dir.resolve(),
            startup_timeout_s=self.settings.startup_timeout_s,
            # Explicit control: the base models load at start; LoRA variants load and unload on demand.
            explicit_model_control=True,
            load_models=repository_models(repository),
            binary=system_tritonserver(self.settings.tritonserver),
            # model.py runs a bigger dynamic batch in chunks (it sees latents, not images).
            environment={
                "T2I_MAX_BATCH_LATENT_PIXELS": str(
                    max(1, self.settings.max_batch_pixels // self.source.vae_scale_factor**2)
                ),
                "T2I_LORA_PRELOAD": ",".join(self._lora_models()) if self.settings.lora_preload else "",
                "T2I_MEMORY_RELEASE_S": str(self.settings.memory_release_s),
            },
        )
        self.triton = BundledTriton(config)
        await asyncio.to_thread(self.triton.start)
        self.client = TritonClient(
            self.triton.http_url,
            self.settings.triton_timeout_s,
            share_inputs=self.settings.triton_shared_memory,
        )


def repository_models(repository: Path) -> tuple[str, ...]:
    """The base models an exported repository lists in its manifest (empty: load everything)."""
    try:
        manifest = json.loads((repository / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return ()
    return tuple(str(name) for name in manifest.get("models", []))


def _warmup_request(model: DiffusionModel, engines: RepositoryEngines) -> GenerationRequest:
    """Smallest image the UNet takes (the smallest engine bucket on tensorrt), with guidance, so every
    model and code path runs once."""
    side = 8 * model.vae_scale_factor
    width, height = side, side
    if engines.resolutions:
        smallest = min(engines.resolutions, key=lambda r: r.width * r.height)
        width, height = smallest.width, smallest.height
    return GenerationRequest(
        prompt="warm-up",
        negative_prompt="",
        height=height,
        width=width,
        guidance_scale=7.5,
        num_inference_steps=2,
        num_images=1,
        seed=0,
    )
