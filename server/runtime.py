"""What the service runs on: the Triton server (bundled or remote), its client, the loaded model.

Start-up runs in the background so ``/health`` answers ``LOADING`` at once: resolve the model's configs,
start the bundled Triton when no ``TRITON_URL`` is set, wait for every model to be ready, then run one
warm-up generation.  Only then is the status ``OK``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

import torch

from export.source import ModelSource, resolve_model
from server.errors import ServiceUnavailable
from server.pipeline.generate import GenerationRequest, TextToImagePipeline
from server.pipeline.model import DiffusionModel
from server.settings import Settings
from server.triton.client import TritonClient
from server.triton.launcher import BundledTriton, TritonLaunchConfig

logger = logging.getLogger(__name__)


class Health(enum.StrEnum):
    LOADING = "LOADING"
    OK = "OK"
    ERROR = "ERROR"
    IDLE = "IDLE"


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status = Health.LOADING
        self.error: str | None = None
        self.triton: BundledTriton | None = None
        self.client: TritonClient | None = None
        self._pipeline: TextToImagePipeline | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pipeline(self) -> TextToImagePipeline:
        if self._pipeline is None or self.status is not Health.OK:
            if self.status is Health.ERROR:
                raise ServiceUnavailable("The service failed to start; see its log.")
            raise ServiceUnavailable("The service is still loading the model; try again shortly.")
        return self._pipeline

    def start(self) -> None:
        self._task = asyncio.create_task(self._start(), name="t2i-startup")

    async def wait_started(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)

    async def _start(self) -> None:
        started = time.perf_counter()
        try:
            torch.set_num_threads(self.settings.torch_threads)
            path = await asyncio.to_thread(resolve_model, self.settings.model_id, weights=False)
            model = await asyncio.to_thread(DiffusionModel, ModelSource(path), self.settings.scheduler)
            self.client = TritonClient(await self._triton_url(), self.settings.triton_timeout_s)
            await self._wait_models(["unet", "vae_decoder", *model.source.text_encoders])
            pipeline = TextToImagePipeline(model, self.client)
            if self.settings.warmup:
                await pipeline(_warmup_request(model))
            self._pipeline = pipeline
            self.status = Health.OK
            logger.info("ready in %.1f s", time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.status = Health.ERROR
            self.error = str(e)
            logger.exception("start-up failed")

    async def _triton_url(self) -> str:
        if self.settings.triton_url:
            return self.settings.triton_url
        config = TritonLaunchConfig(
            model_repository=self.settings.model_repository.resolve(),
            state_dir=self.settings.state_dir.resolve(),
            startup_timeout_s=self.settings.startup_timeout_s,
        )
        self.triton = BundledTriton(config)
        await asyncio.to_thread(self.triton.start)
        return self.triton.grpc_url

    async def _wait_models(self, names: list[str]) -> None:
        assert self.client is not None
        deadline = time.monotonic() + self.settings.startup_timeout_s
        pending = list(names)
        while pending:
            pending = [n for n in pending if not await self.client.model_ready(n)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton at {self.client.url} has not loaded: {', '.join(pending)}")
            await asyncio.sleep(0.5)


def _warmup_request(model: DiffusionModel) -> GenerationRequest:
    """Smallest image the UNet takes, with guidance, so every model and code path runs once."""
    side = 8 * model.vae_scale_factor
    return GenerationRequest(
        prompt="warm-up",
        negative_prompt="",
        height=side,
        width=side,
        guidance_scale=7.5,
        num_inference_steps=2,
        num_images=1,
        seed=0,
    )
