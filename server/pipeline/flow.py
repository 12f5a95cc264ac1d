"""The flow-matching loop of SD3 and FLUX against Triton, step for step what diffusers' pipelines do.

1. encode the prompt(s): CLIP (penultimate hidden states and pooled embeddings) and T5, once per request
2. draw the initial latents from one CPU generator per image (seed + i); FLUX packs them 2x2
3. sigmas as the pipeline sets them (FLUX: linspace with ``mu`` from the image sequence length; SD3:
   the scheduler's own, ``mu`` only with dynamic shifting), then for each timestep the transformer
   on the (SD3: CFG-doubled) latents, guidance, ``scheduler.step`` on the transformer's output
4. FLUX unpacks the latents; the VAE decoder model (scaling and shift factors inside) gives the images

The Triton models and their inputs are :mod:`export.contract.specs`' ``transformer`` specs. FLUX never runs
classifier-free guidance (its negative prompt is ignored); a guidance-distilled FLUX (dev) gets the
guidance scale through its ``guidance`` input.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from export.contract.families import T5
from server.pipeline.generate import (
    Generation,
    InferenceClient,
    StageObserver,
    StepCheck,
    TextToImagePipeline,
    _ignore,
    infer_rows,
)
from server.pipeline.model import DiffusionModel, Prompts
from server.pipeline.request import GenerationRequest, Stage


class FlowMatchPipeline(TextToImagePipeline):
    """SD3 / FLUX generation; same interface as the UNet loop it extends."""

    def __init__(self, model: DiffusionModel, client: InferenceClient) -> None:
        super().__init__(model, client)
        config = self.source.config(self.source.denoiser)
        self.guidance_embeds = self.family.conditioning.guidance_embedding and bool(
            config.get("guidance_embeds")
        )
        self.patch_size = self.source.patch_size

    async def __call__(
        self,
        request: GenerationRequest,
        between_steps: StepCheck | None = None,
        observe: StageObserver = _ignore,
    ) -> Generation:
        family = self.family
        do_cfg = (
            family.classifier_free_guidance and request.guidance_scale > 1 and self.model.guidance_allowed
        )
        positive, negative = self.model.prompts(request.prompt, request.negative_prompt)
        # The base transformer, or the variant a LoRA set named.
        denoiser = request.denoiser or self.source.denoiser

        # 1. text encoders
        start = time.perf_counter()
        cond = await self._encode_flow(positive, negative, do_cfg, request)
        observe(Stage.TEXT_ENCODER, time.perf_counter() - start, 2 if do_cfg else 1)

        # 2. initial latents, sigmas and timesteps
        scheduler = self.model.new_scheduler()
        seeds = [request.seed + i for i in range(request.num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        vsf = self.model.vae_scale_factor
        height, width = request.height // vsf, request.width // vsf
        channels = self.source.latent_channels
        shape = (request.num_images, channels, height, width)
        latents = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        if family.packs_latents:
            latents = _flux_pipeline()._pack_latents(latents, request.num_images, channels, height, width)
            text_length = cond["encoder_hidden_states"].shape[1]
            cond.update(self._flux_ids(height, width, text_length, request.num_images))
            if self.guidance_embeds:
                cond["guidance"] = np.full(request.num_images, request.guidance_scale, dtype=np.float32)
        timesteps = await asyncio.to_thread(
            _set_timesteps,
            scheduler,
            request.num_inference_steps,
            height,
            width,
            self.patch_size,
            family.sets_sigmas,
        )

        # 3. denoising loop
        async with self.client.shared(cond, len(timesteps)) as step_cond:  # the same at every step
            for i, t in enumerate(timesteps):
                if between_steps is not None:
                    await between_steps(i)
                start = time.perf_counter()
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                timestep = np.full(model_input.shape[0], float(t), dtype=np.float32)
                out = await infer_rows(
                    self.client,
                    denoiser,
                    {"hidden_states": model_input.numpy(), "timestep": timestep, **step_cond},
                    "noise_pred",
                    request.model_parameters.get(denoiser),
                )
                latents = await asyncio.to_thread(
                    _flow_step, scheduler, torch.from_numpy(out), t, latents, request.guidance_scale, do_cfg
                )
                observe(Stage.UNET_STEP, time.perf_counter() - start, len(model_input))

        # 4. VAE decoder
        start = time.perf_counter()
        if family.packs_latents:
            latents = _flux_pipeline()._unpack_latents(latents, request.height, request.width, vsf)
        images = await self._decode(latents)
        observe(Stage.VAE, time.perf_counter() - start, len(images))
        return Generation(images=images, seeds=seeds)

    async def _encode_flow(
        self, positive: Prompts, negative: Prompts, do_cfg: bool, request: GenerationRequest
    ) -> dict[str, np.ndarray]:
        """Transformer conditioning, rows ordered [negative x n, positive x n] with guidance.

        SD3: both CLIP encoders' penultimate hidden states side by side, padded to T5's width, then
        T5's tokens; pooled: both CLIP projections side by side.  An empty negative prompt is "".
        FLUX: T5's hidden states and CLIP's pooled output of the first prompt part.
        """
        encoders = request.text_encoders or self.source.text_encoders
        calls = []
        for i, name in enumerate(encoders):
            texts = [positive.parts[i] or ""]
            if do_cfg:
                texts.append(negative.parts[i] or "")
            ids = await asyncio.to_thread(self.model.tokenize, i, texts)
            t5 = self.family.text_encoders[i].kind == T5  # SD3's and FLUX's last encoder
            outputs = ["last_hidden_state"] if t5 else ["penultimate_hidden_state", "pooled"]
            calls.append(
                self.client.infer(name, {"input_ids": ids}, outputs, request.model_parameters.get(name))
            )
        results = await asyncio.gather(*calls)

        t5_hidden = results[-1]["last_hidden_state"]
        if self.family.conditioning.hidden == "t5":
            hidden = t5_hidden
        else:
            clip = np.concatenate([r["penultimate_hidden_state"] for r in results[:-1]], axis=-1)
            width = t5_hidden.shape[-1]
            if clip.shape[-1] < width:
                clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
            hidden = np.concatenate([clip[..., :width], t5_hidden], axis=-2)
        pooled = self._pooled(results)

        n = request.num_images

        def rows(values: np.ndarray) -> np.ndarray:
            pos = np.repeat(values[:1], n, axis=0)
            return np.concatenate([np.repeat(values[1:2], n, axis=0), pos]) if do_cfg else pos

        pooled_input = self.family.conditioning.pooled
        assert pooled_input is not None  # SD3's and FLUX's pooled_projections
        return {"encoder_hidden_states": rows(hidden), pooled_input: rows(pooled)}

    def _flux_ids(self, height: int, width: int, text_length: int, rows: int) -> dict[str, np.ndarray]:
        """FLUX's rotary position ids, the same for every row: image tokens (row, column), text zeros."""
        packing = self.family.latent_packing
        image = _flux_pipeline()._prepare_latent_image_ids(
            1, height // packing, width // packing, "cpu", torch.float32
        )
        return {
            "img_ids": np.repeat(image.numpy()[None], rows, axis=0),
            "txt_ids": np.zeros((rows, text_length, 3), dtype=np.float32),
        }


def _flux_pipeline() -> Any:
    """diffusers' FluxPipeline class: its static packing helpers are the reference."""
    from diffusers import FluxPipeline

    return FluxPipeline


def _set_timesteps(
    scheduler: Any, steps: int, height: int, width: int, patch_size: int, sets_sigmas: bool
) -> torch.Tensor:
    """Sigmas and timesteps exactly as ``FluxPipeline`` (``sets_sigmas``) / ``StableDiffusion3Pipeline``
    set them."""
    config = scheduler.config
    image_seq_len = (height // patch_size) * (width // patch_size)
    if sets_sigmas:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sigmas: Any = np.linspace(1.0, 1 / steps, steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps  # type: ignore[no-any-return]
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift as sd3_shift,
    )
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        retrieve_timesteps as sd3_timesteps,
    )

    kwargs: dict[str, Any] = {}
    if config.get("use_dynamic_shifting", None):
        kwargs["mu"] = sd3_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    timesteps, _ = sd3_timesteps(scheduler, steps, "cpu", sigmas=None, **kwargs)
    return timesteps  # type: ignore[no-any-return]


def _flow_step(
    scheduler: Any,
    noise_pred: torch.Tensor,
    t: torch.Tensor,
    latents: torch.Tensor,
    guidance_scale: float,
    do_cfg: bool,
) -> torch.Tensor:
    if do_cfg:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    return scheduler.step(noise_pred, t, latents, return_dict=False)[0]  # type: ignore[no-any-return]


def pipeline_for(model: DiffusionModel, client: InferenceClient) -> TextToImagePipeline:
    """The loop for the model's family: flow matching for SD3 / FLUX, the UNet loop otherwise."""
    if model.source.family.flow_matching:
        return FlowMatchPipeline(model, client)
    return TextToImagePipeline(model, client)
