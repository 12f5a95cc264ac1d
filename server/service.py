"""The serving object behind the routes: request rules, admission, the pipeline call, the response.

It is handed the supervisor (``server/supervisor.py``) and takes the model from it: the model's
description for the rules, and, once the service serves, the :class:`server.loaded.LoadedModel` a
request runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import msgspec

from export.contract.engines import MIN_LATENT_SIDE
from server.admission import Admission
from server.api.schemas import ImageResponse, Media, TextToImageParams
from server.errors import BadRequest, ClientGone, InferenceFailed, ServiceUnavailable, brief
from server.loras import parse_loras
from server.metrics import Metrics
from server.pipeline.images import png_data_url
from server.pipeline.request import GenerationRequest, Stage
from server.pipeline.rules import apply_rule, rule_for
from server.settings import Settings
from server.supervisor import Health, Supervisor

if TYPE_CHECKING:
    from server.loaded import LoadedModel, ModelDescription
    from server.registry import ServedEntry

logger = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1
# What a request has once admitted: its generation, its LoRA set and the model it runs on.
Prepared = tuple[GenerationRequest, dict[str, float], "LoadedModel"]


class TextToImageService:
    def __init__(self, settings: Settings, supervisor: Supervisor, metrics: Metrics) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.registry = supervisor.registry
        self.metrics = metrics
        # MAX_IN_FLIGHT and MAX_QUEUE bound every model's requests together.
        self.admission = Admission(settings.max_in_flight, settings.max_queue, metrics)

    def health(self) -> Health:
        """``/health``: the supervisor's status, and ``IDLE`` for ``OK`` while no request runs or waits
        (go-livepeer returns a container it took out of its pool only at ``IDLE``)."""
        status = self.supervisor.status
        return Health.IDLE if status is Health.OK and self.admission.idle else status

    @staticmethod
    def require_prompt(params: TextToImageParams) -> None:
        """The reference checks this first, before the bearer token."""
        if not params.prompt.strip():
            raise BadRequest("Prompt must be provided.")

    def model_for(self, model_id: str) -> ServedEntry:
        """The served model a request names (empty: the first); an unknown one is a 400."""
        return self.registry.entry(model_id)

    async def generate(
        self,
        params: TextToImageParams,
        client_gone: Callable[[], bool] = lambda: False,
        entry: ServedEntry | None = None,
    ) -> ImageResponse:
        """Check the request, take a place in the bounded queue, wait there for the service (while it
        loads), for the model (loaded when it is not resident) and for a slot, run it; the deadline
        covers all the waiting too.  ``entry``: the model, already chosen by the request's path."""
        entry = entry or self.model_for(params.model_id)
        description = entry.description
        # with the model known the rules answer at once; while it loads, once it is known
        checked = self._request(params, entry, description) if description is not None else None
        waiting_for = "the service was still loading the model"
        metrics = entry.metrics

        async def prepare(
            stack: contextlib.AsyncExitStack,
        ) -> Prepared:
            nonlocal waiting_for
            request, loras = checked or self._request(
                params, entry, await self.supervisor.wait_description(entry)
            )
            await stack.enter_async_context(self.registry.hold(entry))  # never unloaded from here on
            if not entry.resident and self.supervisor.status is Health.OK:
                waiting_for = f"model '{entry.model_id}' was still loading into Triton"
            loaded = await self.supervisor.ready_model(entry)
            waiting_for = "it was waiting for a free slot"
            return request, loras, loaded

        timeout_s = self.settings.request_timeout_s
        try:
            # admission first: a full service refuses before resolving or building anything
            async with contextlib.AsyncExitStack() as stack, asyncio.timeout(timeout_s):  # noqa: SIM117
                async with self.admission.slot(lambda: prepare(stack)) as (request, loras, loaded):
                    async with loaded.variants.use(loras) as models:
                        waiting_for = "it was generating"
                        request = replace(
                            request,
                            denoiser=models.denoiser,
                            text_encoders=models.text_encoders,
                            model_parameters=models.parameters,
                        )
                        return await self._run(entry, request, params.safety_check, client_gone)
        except TimeoutError:
            metrics.cancelled("deadline").inc()
            raise ServiceUnavailable(
                f"The request did not finish within {timeout_s:g} s (REQUEST_TIMEOUT_S): {waiting_for}; "
                "try again shortly.",
                reason="deadline" if waiting_for.startswith("it was") else "loading",
            ) from None

    async def _run(
        self,
        entry: ServedEntry,
        request: GenerationRequest,
        safety_check: bool,
        client_gone: Callable[[], bool],
    ) -> ImageResponse:
        # Refused now, as at admission, when Triton went away while the variant was made ready.
        loaded = await self.supervisor.ready_model(entry)
        metrics = entry.metrics
        metrics.generations.inc()

        async def between_steps(step: int) -> None:
            if client_gone():
                metrics.cancelled("client_gone").inc()
                raise ClientGone(f"client went away before step {step}")

        def observe(stage: str, seconds: float, rows: int) -> None:
            metrics.stage(stage).observe(seconds)
            if stage == Stage.UNET_STEP:
                metrics.unet_steps.inc()
                metrics.unet_rows.observe(rows)

        started = time.perf_counter()
        try:
            result = await loaded.pipeline(request, between_steps, observe)
        except (ServiceUnavailable, InferenceFailed) as e:
            self.supervisor.report_failure(e)
            raise
        nsfw = [False] * len(result.images)
        safety = loaded.safety_checker
        if safety_check and safety is not None:
            start = time.perf_counter()
            nsfw = await safety.check(result.images)
            observe(Stage.SAFETY_CHECK, time.perf_counter() - start, len(result.images))
        start = time.perf_counter()
        urls = await asyncio.to_thread(lambda: [png_data_url(image) for image in result.images])
        observe(Stage.PNG_ENCODE, time.perf_counter() - start, len(urls))
        metrics.images.inc(len(urls))
        logger.info(
            "generated %d image(s) %dx%d, %d steps, guidance %g in %.2f s (%s)",
            len(urls),
            request.width,
            request.height,
            request.num_inference_steps,
            request.guidance_scale,
            time.perf_counter() - started,
            entry.model_id,
        )
        media = [Media(url=u, seed=s, nsfw=n) for u, s, n in zip(urls, result.seeds, nsfw, strict=True)]
        return ImageResponse(images=media)

    def _request(
        self, params: TextToImageParams, entry: ServedEntry, description: ModelDescription
    ) -> tuple[GenerationRequest, dict[str, float]]:
        """Apply the API's rules (``entry``'s: its size rules, engines and distilled-model rule); every
        violation is a 400 with a message naming the field.

        Returns the generation and the parsed LoRA set (both checked before any generation)."""
        s = self.settings
        self.require_prompt(params)
        if params.model_id and params.model_id != entry.model_id:
            raise BadRequest(
                f"Model '{brief(params.model_id)}' is not served here; this path serves '{entry.model_id}'."
            )
        model, engines = description.model, description.engines
        vae_scale, size_multiple, max_side = model.vae_scale_factor, model.size_multiple, model.max_side
        loras = parse_loras(params.loras, s.max_loras)
        min_side = MIN_LATENT_SIDE * vae_scale
        # SD3 / FLUX: the transformer's 2x2 patches make sides multiples of 16, not 8.
        multiple = size_multiple or vae_scale
        for name, value in (("height", params.height), ("width", params.width)):
            if value < min_side or value % multiple:
                raise BadRequest(
                    f"{name} must be a multiple of {multiple} of at least {min_side}, got {value}."
                )
            if max_side is not None and value > max_side:
                raise BadRequest(f"{name} must be at most {max_side} for this model, got {value}.")
        if params.height * params.width > s.max_pixels:
            raise BadRequest(
                f"Image size {params.width}x{params.height} is above this service's limit "
                f"of {s.max_pixels} pixels."
            )
        if not engines.serves(params.width, params.height):
            raise BadRequest(
                f"Image size {params.width}x{params.height} is not served by this model's TensorRT engines; "
                f"served sizes (width x height): {engines.served_sizes()}."
            )
        if not math.isfinite(params.guidance_scale):
            raise BadRequest("guidance_scale must be a finite number.")
        n = params.num_images_per_prompt
        if not 1 <= n <= s.max_images:
            raise BadRequest(f"num_images_per_prompt must be between 1 and {s.max_images}, got {n}.")
        seed = secrets.randbelow(2**32) if params.seed is msgspec.UNSET else params.seed
        if not 0 <= seed <= MAX_SEED - (n - 1):
            raise BadRequest(f"seed must be between 0 and {MAX_SEED - (n - 1)}, got {seed}.")
        guidance_scale, steps = apply_rule(
            rule_for(entry.model_id), params.guidance_scale, params.num_inference_steps
        )
        if steps > s.max_steps:
            raise BadRequest(f"num_inference_steps must be at most {s.max_steps}, got {steps}.")
        rows = n * (2 if guidance_scale > 1 and model.guidance_allowed else 1)
        if rows * params.height * params.width > s.max_batch_pixels:
            raise BadRequest(
                f"{n} image(s) of {params.width}x{params.height}"
                f"{' with guidance' if rows > n else ''} are above this service's limit of "
                f"{s.max_batch_pixels} pixels per batch; ask for fewer images or a smaller size."
            )
        request = GenerationRequest(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            height=params.height,
            width=params.width,
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            num_images=n,
            seed=seed,
        )
        return request, loras
