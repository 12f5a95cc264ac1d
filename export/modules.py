"""The torch modules that become Triton models, each wrapped to the I/O of its spec.

A :class:`Component` ties a model spec to the loader of its torch module, so the exporter, the
numerical check and the repository writer all walk the same list (:func:`components`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from export import specs
from export.source import ModelSource, ModelSourceError


class TextEncoderModule(nn.Module):
    """CLIP text encoder with int32 ids in and (last, penultimate, pooled) out."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids.to(torch.int64), output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class UNetModule(nn.Module):
    """UNet step; with ``sdxl`` the pooled text embeddings and time ids are extra inputs."""

    def __init__(self, unet: nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        out = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )
        return out[0]  # type: ignore[no-any-return]


class VaeDecoderModule(nn.Module):
    """Latents straight from the denoising loop -> images in [0, 1], as diffusers' pipelines do it."""

    latents_mean: torch.Tensor
    latents_std: torch.Tensor

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        channels = int(config.latent_channels)
        self.register_buffer("latents_mean", _channel_tensor(mean, channels), persistent=False)
        self.register_buffer("latents_std", _channel_tensor(std, channels), persistent=False)
        self.has_latents_stats = mean is not None and std is not None

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.has_latents_stats:
            latent = latent * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latent = latent / self.scaling_factor
        image = self.vae.decode(latent, return_dict=False)[0]  # type: ignore[operator]
        return (image / 2 + 0.5).clamp(0, 1)  # type: ignore[no-any-return]


def _channel_tensor(values: list[float] | None, channels: int) -> torch.Tensor:
    if values is None:
        return torch.zeros(1, channels, 1, 1)
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


@dataclass(frozen=True)
class Component:
    """One Triton model: its spec, the diffusers subfolders it is built from, and its torch loader."""

    spec: specs.ModelSpec
    subfolders: tuple[str, ...]
    load: Callable[[], nn.Module]
    # Latent size to trace at: not a multiple of the UNet's up factor, so the traced graph keeps the
    # explicit upsample sizes and works for every resolution.
    trace_sizes: dict[str, int]


def latent_range(source: ModelSource) -> specs.AxisRange:
    sample = int(source.config("unet")["sample_size"])
    return specs.AxisRange(8, sample, max(2 * sample, 128))


def components(source: ModelSource) -> list[Component]:
    """The Triton models of ``source`` in export order: text encoder(s), UNet, VAE decoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = str(source.path)
    result: list[Component] = []
    for name in source.text_encoders:
        config = source.config(name)
        with_projection = "WithProjection" in "".join(config.get("architectures") or [])
        pooled = int(config["projection_dim"] if with_projection else config["hidden_size"])
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel

        def load_encoder(cls: Any = cls, name: str = name) -> nn.Module:
            encoder = cls.from_pretrained(path, subfolder=name, attn_implementation="eager")
            return TextEncoderModule(encoder)

        result.append(
            Component(
                spec=specs.text_encoder_spec(name, int(config["hidden_size"]), pooled),
                subfolders=(name,),
                load=load_encoder,
                trace_sizes={"batch": 2},
            )
        )

    unet_config = source.config("unet")
    if unet_config.get("time_cond_proj_dim") is not None:
        # Its UNet takes the guidance scale as an embedding (``timestep_cond``, as diffusers'
        # LatentConsistencyModelPipeline computes it); a graph traced without it gives wrong images.
        raise ModelSourceError(
            f"{source.path}: the UNet has time_cond_proj_dim={unet_config['time_cond_proj_dim']} "
            "(a guidance-distilled model such as LCM, whose UNet takes a guidance-scale embedding "
            "as its timestep_cond input); such models are not supported yet, and exporting the UNet "
            "without that input would give wrong images"
        )
    lrange = latent_range(source)
    text_embeds_dim = None
    if source.is_sdxl:
        text_embeds_dim = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(
            unet_config["addition_time_embed_dim"]
        )
    result.append(
        Component(
            spec=specs.unet_spec(
                in_channels=int(unet_config["in_channels"]),
                out_channels=int(unet_config["out_channels"]),
                cross_attention_dim=int(unet_config["cross_attention_dim"]),
                latent_range=lrange,
                text_embeds_dim=text_embeds_dim,
            ),
            subfolders=("unet",),
            load=lambda: UNetModule(
                UNet2DConditionModel.from_pretrained(path, subfolder="unet"), source.is_sdxl
            ),
            trace_sizes={"batch": 2, "height": lrange.min + 1, "width": lrange.min + 3},
        )
    )
    result.append(
        Component(
            spec=specs.vae_decoder_spec(
                latent_channels=int(source.config("vae")["latent_channels"]),
                scale_factor=source.vae_scale_factor,
                latent_range=lrange,
            ),
            subfolders=("vae",),
            load=lambda: VaeDecoderModule(AutoencoderKL.from_pretrained(path, subfolder="vae")),
            trace_sizes={"batch": 1, "height": lrange.min + 1, "width": lrange.min + 3},
        )
    )
    return result
