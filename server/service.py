"""The serving object behind the routes: request rules, seeds, the pipeline call, the response."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets

from server.api.schemas import ImageResponse, Media, TextToImageParams
from server.errors import BadRequest
from server.loras import parse_loras
from server.pipeline.generate import GenerationRequest, StepCheck
from server.pipeline.images import png_data_url
from server.runtime import Runtime
from server.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 50
MIN_LATENT_SIDE = 8
MAX_SEED = 2**64 - 1


class TextToImageService:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime

    async def generate(
        self, params: TextToImageParams, between_steps: StepCheck | None = None
    ) -> ImageResponse:
        pipeline = self.runtime.pipeline
        request = self._request(params, pipeline.model.vae_scale_factor)
        result = await pipeline(request, between_steps)
        urls = await asyncio.to_thread(lambda: [png_data_url(image) for image in result.images])
        logger.info(
            "generated %d image(s) %dx%d in %d steps: text %.3f s, unet %.3f s, vae %.3f s",
            len(urls),
            request.width,
            request.height,
            len(result.times.unet_steps),
            result.times.text_encoder,
            sum(result.times.unet_steps),
            result.times.vae,
        )
        return ImageResponse(
            images=[Media(url=u, seed=s, nsfw=False) for u, s in zip(urls, result.seeds, strict=True)]
        )

    def _request(self, params: TextToImageParams, vae_scale: int) -> GenerationRequest:
        """Apply the API's rules; every violation is a 400 with a message naming the field."""
        s = self.settings
        if params.model_id and params.model_id != s.model_id:
            raise BadRequest(
                f"Model '{params.model_id}' is not served here; this service serves '{s.model_id}'."
            )
        if not params.prompt.strip():
            raise BadRequest("Prompt must be provided.")
        if parse_loras(params.loras, s.max_loras):
            raise BadRequest("LoRA variants are not available on this service yet.")
        min_side = MIN_LATENT_SIDE * vae_scale
        for name, value in (("height", params.height), ("width", params.width)):
            if value < min_side or value % vae_scale:
                raise BadRequest(
                    f"{name} must be a multiple of {vae_scale} of at least {min_side}, got {value}."
                )
        if params.height * params.width > s.max_pixels:
            raise BadRequest(
                f"Image size {params.width}x{params.height} is above this service's limit "
                f"of {s.max_pixels} pixels."
            )
        if not math.isfinite(params.guidance_scale):
            raise BadRequest("guidance_scale must be a finite number.")
        n = params.num_images_per_prompt
        if not 1 <= n <= s.max_images:
            raise BadRequest(f"num_images_per_prompt must be between 1 and {s.max_images}, got {n}.")
        seed = secrets.randbelow(2**32) if params.seed is None else params.seed
        if not 0 <= seed <= MAX_SEED - (n - 1):
            raise BadRequest(f"seed must be between 0 and {MAX_SEED - (n - 1)}, got {seed}.")
        steps = params.num_inference_steps if params.num_inference_steps >= 1 else DEFAULT_STEPS
        return GenerationRequest(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            height=params.height,
            width=params.width,
            guidance_scale=params.guidance_scale,
            num_inference_steps=steps,
            num_images=n,
            seed=seed,
        )
