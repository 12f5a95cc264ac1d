"""The denoising loop against Triton, step for step what diffusers' SD / SDXL pipelines do.

1. encode the prompt(s) with the text encoder model(s), once per request
2. draw the initial latents from one CPU generator per image (seed + i)
3. for each scheduler timestep: UNet on the (CFG-doubled) latents, guidance, ``scheduler.step``
4. decode with the VAE decoder model and turn the images into uint8 arrays

Every request is its own coroutine; concurrent requests meet in Triton's dynamic batcher.  The CPU
math between steps runs in a worker thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from export.contract import specs
from server.pipeline.model import DiffusionModel, Prompts
from server.pipeline.request import GenerationRequest, Stage

logger = logging.getLogger(__name__)


class InferenceClient(Protocol):
    """What the pipeline needs from the inference server (the Triton adapter implements it).

    ``inputs`` are arrays, or what :meth:`shared` gave in place of some (rows of them can be taken).
    """

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]: ...

    async def max_batch_size(self, name: str) -> int: ...

    def shared(
        self, arrays: Mapping[str, np.ndarray], uses: int
    ) -> AbstractAsyncContextManager[Mapping[str, Any]]:
        """``arrays`` as inputs of ``uses`` calls within the block (a request's conditioning across
        its steps): the arrays themselves, or handles the server reads them through."""
        ...


@dataclass(frozen=True)
class Generation:
    images: list[np.ndarray]  # uint8 HWC, one per image
    seeds: list[int]


# Called before each step; raising stops the loop (client gone, deadline passed).
StepCheck = Callable[[int], Awaitable[None]]
# Told how long each stage took: (the stage, seconds, rows).
StageObserver = Callable[[str, float, int], None]


def _ignore(stage: str, seconds: float, rows: int) -> None:
    pass


class TextToImagePipeline:
    def __init__(self, model: DiffusionModel, client: InferenceClient) -> None:
        self.model = model
        self.client = client
        self.source = model.source
        self.family = model.source.family

    async def __call__(
        self,
        request: GenerationRequest,
        between_steps: StepCheck | None = None,
        observe: StageObserver = _ignore,
    ) -> Generation:
        do_cfg = request.guidance_scale > 1 and self.model.guidance_allowed
        positive, negative = self.model.prompts(request.prompt, request.negative_prompt)
        # The base UNet, or the variant a LoRA set named.
        denoiser = request.denoiser or self.source.denoiser

        # 1. text encoders
        start = time.perf_counter()
        cond = await self._encode(positive, negative, do_cfg, request)
        observe(Stage.TEXT_ENCODER, time.perf_counter() - start, 2 if do_cfg else 1)

        # 2. timesteps and initial latents
        scheduler = self.model.new_scheduler()
        scheduler.set_timesteps(request.num_inference_steps, device="cpu")
        seeds = [request.seed + i for i in range(request.num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        vsf = self.model.vae_scale_factor
        shape = (request.num_images, self.source.latent_channels, request.height // vsf, request.width // vsf)
        latents = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generators)

        # 3. denoising loop: one CPU hand-off per step (none for small latents), the scheduler's
        # step and the next step's scaled input in one go
        timesteps = list(scheduler.timesteps)
        cpu = _cpu_runner(latents.numel() * (2 if do_cfg else 1))
        model_input = await cpu(_model_input, scheduler, latents, timesteps[0], do_cfg)
        async with self.client.shared(cond, len(timesteps)) as step_cond:  # the same at every step
            for i, t in enumerate(timesteps):
                if between_steps is not None:
                    await between_steps(i)
                start = time.perf_counter()
                timestep = np.full(model_input.shape[0], float(t), dtype=np.float32)
                out = await infer_rows(
                    self.client,
                    denoiser,
                    {"sample": model_input.numpy(), "timestep": timestep, **step_cond},
                    "noise_pred",
                    request.model_parameters.get(denoiser),
                )
                rows = len(model_input)
                latents, model_input = await cpu(
                    _advance,
                    scheduler,
                    torch.from_numpy(out),
                    t,
                    latents,
                    request.guidance_scale,
                    do_cfg,
                    step_kwargs,
                    timesteps[i + 1] if i + 1 < len(timesteps) else None,
                )
                observe(Stage.UNET_STEP, time.perf_counter() - start, rows)

        # 4. VAE decoder
        start = time.perf_counter()
        images = await self._decode(latents)
        observe(Stage.VAE, time.perf_counter() - start, len(images))
        return Generation(images=images, seeds=seeds)

    async def _decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """The VAE decoder model on ``latents``, then uint8 images (the conversion off the loop)."""
        decoded = await infer_rows(self.client, specs.VAE_DECODER, {"latent": latents.numpy()}, "images")
        return await asyncio.to_thread(_to_uint8, decoded)

    async def _encode(
        self, positive: Prompts, negative: Prompts, do_cfg: bool, request: GenerationRequest
    ) -> dict[str, np.ndarray]:
        """UNet conditioning inputs, rows ordered [negative x n, positive x n] with guidance.

        SDXL's negative embeddings are zeros when no negative prompt is given and the model says
        ``force_zeros_for_empty_prompt``; its time ids are (original size, crop (0, 0), target size).
        """
        num_images = request.num_images
        zero_negative = do_cfg and negative.parts[0] is None and self.source.force_zeros_for_empty_prompt
        encode_negative = do_cfg and not zero_negative
        calls = []
        for i, name in enumerate(request.text_encoders or self.source.text_encoders):
            texts = [positive.parts[i] or ""]
            if encode_negative:
                texts.append(negative.parts[i] or "")
            outputs = ["last_hidden_state", "penultimate_hidden_state", "pooled"]
            input_ids = await asyncio.to_thread(self.model.tokenize, i, texts)
            parameters = request.model_parameters.get(name)
            calls.append(self.client.infer(name, {"input_ids": input_ids}, outputs, parameters))
        results = await asyncio.gather(*calls)

        conditioning = self.family.conditioning
        if conditioning.hidden == "penultimate":
            hidden = np.concatenate([r["penultimate_hidden_state"] for r in results], axis=-1)
        else:
            hidden = results[0]["last_hidden_state"]
        pooled = self._pooled(results) if conditioning.pooled else None
        pos_hidden, pos_pooled = hidden[:1], None if pooled is None else pooled[:1]
        if encode_negative:
            neg_hidden, neg_pooled = hidden[1:2], None if pooled is None else pooled[1:2]
        else:
            neg_hidden, neg_pooled = (
                np.zeros_like(pos_hidden),
                None if pooled is None else np.zeros_like(pos_pooled),
            )

        def rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
            pos = np.repeat(pos, num_images, axis=0)
            return np.concatenate([np.repeat(neg, num_images, axis=0), pos]) if do_cfg else pos

        cond = {"encoder_hidden_states": rows(pos_hidden, neg_hidden)}
        if conditioning.pooled:
            assert pos_pooled is not None and neg_pooled is not None
            cond[conditioning.pooled] = rows(pos_pooled, neg_pooled)
        if conditioning.time_ids:
            h, w = request.height, request.width
            time_ids = np.array([[h, w, 0, 0, h, w]], dtype=np.float32)
            cond["time_ids"] = np.repeat(time_ids, len(cond["encoder_hidden_states"]), axis=0)
        return cond

    def _pooled(self, results: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """The pooled embeddings: the pooled outputs of the encoders the family pools, side by side."""
        encoders = self.family.text_encoders
        return np.concatenate(
            [r["pooled"] for r, e in zip(results, encoders, strict=True) if e.pooled], axis=-1
        )


async def infer_rows(
    client: InferenceClient,
    model: str,
    inputs: Mapping[str, Any],
    output: str,
    parameters: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Infer ``inputs`` in chunks of at most the model's max batch size; chunks go out concurrently."""
    rows = len(next(iter(inputs.values())))
    limit = await client.max_batch_size(model) or rows
    chunks = [
        client.infer(model, {k: v[s : s + limit] for k, v in inputs.items()}, [output], parameters)
        for s in range(0, rows, limit)
    ]
    results = await asyncio.gather(*chunks)
    return np.concatenate([r[output] for r in results]) if len(results) > 1 else results[0][output]


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """``eta`` and ``generator`` for schedulers whose ``step`` takes them, as diffusers passes them."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def _model_input(scheduler: Any, latents: torch.Tensor, t: torch.Tensor, do_cfg: bool) -> torch.Tensor:
    model_input = torch.cat([latents] * 2) if do_cfg else latents
    return scheduler.scale_model_input(model_input, t)  # type: ignore[no-any-return]


def _advance(
    scheduler: Any,
    noise_pred: torch.Tensor,
    t: torch.Tensor,
    latents: torch.Tensor,
    guidance_scale: float,
    do_cfg: bool,
    step_kwargs: dict[str, Any],
    next_t: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance and ``scheduler.step`` for ``t``, then the scaled model input for ``next_t`` (the
    calls in diffusers' order); after the last step the latents themselves stand in for the input."""
    if do_cfg:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    if next_t is None:
        return latents, latents
    return latents, _model_input(scheduler, latents, next_t, do_cfg)


# Below this many latent elements per step (SD 1.5 at 512x512 with guidance: 32768), the scheduler
# math costs less than a hand-off to a worker thread and back, so it runs on the event loop; above
# it (SDXL at 1024x1024, several images) it runs in a worker thread and the loop stays free.
INLINE_MAX_ELEMENTS = 1 << 16

_T = TypeVar("_T")


def _cpu_runner(elements: int) -> Callable[..., Awaitable[Any]]:
    """How to run a step's CPU math for latents of ``elements`` elements: inline or in a thread."""
    if elements > INLINE_MAX_ELEMENTS:
        return asyncio.to_thread

    async def inline(fn: Callable[..., _T], *args: Any) -> _T:
        return fn(*args)

    return inline


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """[n, 3, H, W] floats in [0, 1] -> n uint8 HWC arrays, rounded as diffusers' ``numpy_to_pil``."""
    hwc = (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    return list(hwc)
