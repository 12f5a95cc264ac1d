"""The torch modules that become Triton models, each wrapped to the I/O of its spec.

A :class:`Component` ties a model spec to the loader of its torch module, so the exporter, the
numerical check and the repository writer all walk the same list (:func:`components`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.contract import specs
from export.contract.families import CLIP_PROJECTION, T5
from export.models.source import ModelSource, ModelSourceError
from export.models.weights import (
    AUTO,
    Library,
    WeightChoice,
    choose_weights,
    folder_files,
    variant_preference,
)


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
    """UNet step; with ``text_time`` (SDXL's added conditions) the pooled text embeddings and time ids
    are extra inputs."""

    def __init__(self, unet: nn.Module, text_time: bool) -> None:
        super().__init__()
        self.unet = unet
        self.text_time = text_time

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.text_time else None
        out = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )
        return out[0]  # type: ignore[no-any-return]


class T5EncoderModule(nn.Module):
    """T5 encoder with int32 ids in and its last hidden state out (SD3's and FLUX's prompt embeddings)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.to(torch.int64))[0]  # type: ignore[no-any-return]


class ExplicitRMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` written out: the ONNX exporter at opset 17 has no ``aten::rms_norm``.

    Keeps the original ``weight`` parameter (same name), so state-dict names are unchanged.
    """

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x if self.weight is None else x * self.weight


def explicit_rms_norms(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.RMSNorm`` inside ``module`` (FLUX's and SD3.5's q/k norms) in place."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.RMSNorm) and name:
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, ExplicitRMSNorm(child))
    return module


class SD3TransformerModule(nn.Module):
    """SD3 transformer step with the scheduler's timestep, as ``StableDiffusion3Pipeline`` calls it."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = explicit_rms_norms(transformer)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor:
        out = self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )
        return out[0]  # type: ignore[no-any-return]


def _traceable_rotary(
    x: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor], **kwargs: Any
) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` for FLUX (real cos/sin, pairs on the last axis, sequence axis 1)
    with ``unflatten`` for its ``reshape(*x.shape[:-1], -1, 2)``: the tracer records that reshape with
    the trace's fixed sizes, so the graph would take only the traced resolution.  Same arithmetic."""
    cos, sin = freqs_cis
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def _flux_traceable_rotary() -> Iterator[None]:
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _traceable_rotary  # type: ignore[assignment]
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


class FluxTransformerModule(nn.Module):
    """FLUX transformer step as ``FluxPipeline`` calls it: the timestep divided by 1000, the position
    ids of the first row (all rows of a batch share them), ``guidance`` for guidance-distilled models."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = explicit_rms_norms(transformer)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with _flux_traceable_rotary():
            out = self.transformer(
                hidden_states=hidden_states,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled_projections,
                encoder_hidden_states=encoder_hidden_states,
                txt_ids=txt_ids[0],
                img_ids=img_ids[0],
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
        # SD3 / FLUX: latents / scaling_factor + shift_factor.
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = None if shift is None else float(shift)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.has_latents_stats:
            latent = latent * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latent = latent / self.scaling_factor
            if self.shift_factor is not None:
                latent = latent + self.shift_factor
        image = self.vae.decode(latent, return_dict=False)[0]  # type: ignore[operator]
        return (image / 2 + 0.5).clamp(0, 1)  # type: ignore[no-any-return]


def _channel_tensor(values: list[float] | None, channels: int) -> torch.Tensor:
    if values is None:
        return torch.zeros(1, channels, 1, 1)
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


Loader = Callable[[torch.dtype, WeightChoice], nn.Module]


@dataclass(frozen=True)
class Component:
    """One Triton model: its spec, the diffusers subfolders it is built from (relative to ``root``; the
    first holds the weights), and its torch loader."""

    spec: specs.ModelSpec
    subfolders: tuple[str, ...]
    loader: Loader
    # Latent size to trace at: not a multiple of the UNet's up factor, so the traced graph keeps the
    # explicit upsample sizes and works for every resolution.
    trace_sizes: dict[str, int]
    root: Path
    # Whose ``from_pretrained`` reads the weights (the file names differ).
    library: Library = "diffusers"

    @property
    def weights_folder(self) -> str:
        return self.subfolders[0]

    def weights(
        self, precision: str = "fp32", variant: str = AUTO, files: Sequence[str] | None = None
    ) -> WeightChoice:
        """The weight files an export in ``precision`` reads (``files``: the root's listing, default the
        local folder's).  Raises :class:`export.models.weights.MissingWeightsError` (one line)."""
        listing = folder_files(self.root) if files is None else files
        preference = variant_preference(precision, variant)
        return choose_weights(listing, self.weights_folder, self.library, preference, root=str(self.root))

    def source_files(self, weights: WeightChoice) -> list[str]:
        """The files (relative to ``root``) the module is built from: the chosen weight files and the
        JSON configs of its subfolders (not the other variants, formats or frameworks' weights)."""
        chosen = set(weights.files)
        files = []
        for sub in self.subfolders:
            for f in sorted((self.root / sub).rglob("*")):
                rel = f.relative_to(self.root).as_posix()
                if f.is_file() and (rel in chosen or f.suffix == ".json"):
                    files.append(rel)
        return files

    def load(self, dtype: torch.dtype = torch.float32, weights: WeightChoice | None = None) -> nn.Module:
        """The module with its parameters in ``dtype``, read from ``weights`` (default: the files an
        export in that precision reads), whatever the configs say."""
        if weights is None:
            weights = self.weights(_PRECISION_NAMES.get(dtype, "fp32"))
        from safetensors import SafetensorError

        try:
            return self.loader(dtype, weights)
        except (OSError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSourceError(f"{self.root}/{weights.describe()}: cannot load: {first}") from e


_PRECISION_NAMES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def _diffusers(cls: Any, root: Path, subfolder: str) -> Callable[[torch.dtype, WeightChoice], Any]:
    """A loader of diffusers model ``cls`` from ``root/subfolder`` in the dtype asked for (``dtype=``:
    diffusers 0.42 deprecates ``torch_dtype``)."""

    def load(dtype: torch.dtype, weights: WeightChoice) -> Any:
        return cls.from_pretrained(
            str(root), subfolder=subfolder, dtype=dtype, **weights.from_pretrained_kwargs()
        )

    return load


def transformers_model(
    cls: Any, root: Path, subfolder: str, dtype: torch.dtype, weights: WeightChoice
) -> Any:
    """transformers model ``cls`` from ``root/subfolder`` in ``dtype`` (transformers 5 otherwise loads the
    dtype its config names), with eager attention (the ONNX exporter traces it)."""
    return cls.from_pretrained(
        str(root),
        subfolder=subfolder,
        dtype=dtype,
        attn_implementation="eager",
        **weights.from_pretrained_kwargs(),
    )


def latent_range(source: ModelSource) -> specs.AxisRange:
    family = source.family
    if family.pos_embed_limit:
        # The SD3 transformer crops its position embedding: at most pos_embed_max_size patches a side.
        config = source.config(source.denoiser)
        top = int(config.get("pos_embed_max_size") or 96) * source.patch_size
        return specs.AxisRange(8, min(int(config["sample_size"]), top), top)
    if family.latent_range is not None:
        return family.latent_range
    sample = int(source.config(source.denoiser)["sample_size"])
    return specs.AxisRange(8, sample, max(2 * sample, 128))


def components(source: ModelSource) -> list[Component]:
    """The Triton models of ``source`` in export order: text encoder(s), UNet, VAE decoder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = source.path
    result: list[Component] = []
    for encoder in source.family.text_encoders:
        name = encoder.name
        config = source.config(name)
        if encoder.kind == T5:
            result.append(_t5_component(root, name, config))
            continue
        with_projection = encoder.kind == CLIP_PROJECTION
        pooled = int(config["projection_dim"] if with_projection else config["hidden_size"])
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel

        def load_encoder(
            dtype: torch.dtype, weights: WeightChoice, cls: Any = cls, name: str = name
        ) -> nn.Module:
            return TextEncoderModule(transformers_model(cls, root, name, dtype, weights))

        result.append(
            Component(
                spec=specs.text_encoder_spec(name, int(config["hidden_size"]), pooled),
                subfolders=(name,),
                loader=load_encoder,
                trace_sizes={"batch": 2},
                root=root,
                library="transformers",
            )
        )

    if source.denoiser == specs.UNET:
        _refuse_guidance_embedding(source)
    lrange = latent_range(source)
    result.append(_DENOISER_COMPONENTS[source.family.denoiser_class](source, lrange))
    load_vae = _diffusers(AutoencoderKL, root, "vae")
    result.append(
        Component(
            spec=specs.vae_decoder_spec(
                latent_channels=int(source.config("vae")["latent_channels"]),
                scale_factor=source.vae_scale_factor,
                latent_range=lrange,
            ),
            subfolders=("vae",),
            loader=lambda dtype, weights: VaeDecoderModule(load_vae(dtype, weights)),
            trace_sizes={"batch": 1, "height": lrange.min + 1, "width": lrange.min + 3},
            root=root,
        )
    )
    return result


def _t5_component(root: Path, name: str, config: dict[str, Any]) -> Component:
    from transformers import T5EncoderModel

    def load(dtype: torch.dtype, weights: WeightChoice) -> nn.Module:
        return T5EncoderModule(transformers_model(T5EncoderModel, root, name, dtype, weights))

    return Component(
        spec=specs.t5_encoder_spec(name, int(config["d_model"]), int(config["vocab_size"])),
        subfolders=(name,),
        loader=load,
        trace_sizes={"batch": 2, "sequence": 7},
        root=root,
        library="transformers",
    )


# SD3's and FLUX's transformers are traced at a non-square size that is no multiple of 4 patches.


def _sd3_component(source: ModelSource, lrange: specs.AxisRange) -> Component:
    from diffusers import SD3Transformer2DModel

    root = source.path
    config = source.config(specs.TRANSFORMER)
    load_sd3 = _diffusers(SD3Transformer2DModel, root, specs.TRANSFORMER)
    patch = source.patch_size
    return Component(
        spec=specs.sd3_transformer_spec(
            in_channels=int(config["in_channels"]),
            out_channels=int(config.get("out_channels") or config["in_channels"]),
            patch_size=patch,
            joint_attention_dim=int(config["joint_attention_dim"]),
            pooled_projection_dim=int(config["pooled_projection_dim"]),
            latent_range=lrange,
        ),
        subfolders=(specs.TRANSFORMER,),
        loader=lambda dtype, weights: SD3TransformerModule(load_sd3(dtype, weights)),
        root=root,
        trace_sizes={
            "batch": 2,
            "height": lrange.min + patch,
            "width": lrange.min + 3 * patch,
            "text_length": specs.TOKEN_LENGTH + 7,
        },
    )


def _flux_component(source: ModelSource, lrange: specs.AxisRange) -> Component:
    from diffusers import FluxTransformer2DModel

    root = source.path
    config = source.config(specs.TRANSFORMER)
    side = lrange.min // source.family.latent_packing
    load_flux = _diffusers(FluxTransformer2DModel, root, specs.TRANSFORMER)
    return Component(
        spec=specs.flux_transformer_spec(
            in_channels=int(config["in_channels"]),
            guidance=bool(config.get("guidance_embeds")),
            joint_attention_dim=int(config["joint_attention_dim"]),
            pooled_projection_dim=int(config["pooled_projection_dim"]),
            latent_range=lrange,
        ),
        subfolders=(specs.TRANSFORMER,),
        loader=lambda dtype, weights: FluxTransformerModule(load_flux(dtype, weights)),
        root=root,
        trace_sizes={"batch": 2, "image_tokens": (side + 1) * (side + 3), "text_length": 7},
    )


def _unet_component(source: ModelSource, lrange: specs.AxisRange) -> Component:
    from diffusers import UNet2DConditionModel

    load_unet = _diffusers(UNet2DConditionModel, source.path, "unet")
    unet_config = source.config("unet")
    text_time = source.family.conditioning.time_ids
    text_embeds_dim = None
    if text_time:
        text_embeds_dim = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(
            unet_config["addition_time_embed_dim"]
        )
    return Component(
        spec=specs.unet_spec(
            in_channels=int(unet_config["in_channels"]),
            out_channels=int(unet_config["out_channels"]),
            cross_attention_dim=int(unet_config["cross_attention_dim"]),
            latent_range=lrange,
            text_embeds_dim=text_embeds_dim,
        ),
        subfolders=("unet",),
        loader=lambda dtype, weights: UNetModule(load_unet(dtype, weights), text_time),
        trace_sizes={"batch": 2, "height": lrange.min + 1, "width": lrange.min + 3},
        root=source.path,
    )


# The component of each denoiser class a family names (ModelFamily.denoiser_class).
_DENOISER_COMPONENTS: dict[str, Callable[[ModelSource, specs.AxisRange], Component]] = {
    "UNet2DConditionModel": _unet_component,
    "SD3Transformer2DModel": _sd3_component,
    "FluxTransformer2DModel": _flux_component,
}


def _refuse_guidance_embedding(source: ModelSource) -> None:
    """A UNet with ``time_cond_proj_dim`` (LCM-distilled) takes the guidance scale as an embedding
    (``timestep_cond``, as diffusers' LatentConsistencyModelPipeline computes it); a graph traced
    without it gives wrong images, so such a model is refused at export."""
    dim = source.config("unet").get("time_cond_proj_dim")
    if dim is not None:
        raise ModelSourceError(
            f"{source.path}: the UNet has time_cond_proj_dim={dim} "
            "(a guidance-distilled model such as LCM, whose UNet takes a guidance-scale embedding "
            "as its timestep_cond input); such models are not supported yet, and exporting the UNet "
            "without that input would give wrong images"
        )
