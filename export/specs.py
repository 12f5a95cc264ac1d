"""One I/O spec per Triton model: names, dtypes, dynamic axes and min/opt/max sizes.

The same spec drives the ONNX export (input/output names, dynamic axes), the verification shapes,
the TensorRT optimisation profiles and the generated ``config.pbtxt``.  The service speaks to Triton
with these names too, so they are the single contract between export/ and server/.

Shapes list every axis including the batch axis.  An axis is either a fixed size or the name of a
dynamic axis (``"batch"``, ``"height"``, ``"width"``...); each dynamic axis has a
:class:`AxisRange` on the model spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Model names inside a generated Triton repository.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
VAE_DECODER = "vae_decoder"

TOKEN_LENGTH = 77

Axis = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a numpy dtype name: "float32", "int32"
    shape: tuple[Axis, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: axis for i, axis in enumerate(self.shape) if isinstance(axis, str)}

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[a] if isinstance(a, str) else a for a in self.shape)


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"axis range must satisfy 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, AxisRange]
    # Sizes the export check runs at: two batch sizes and two resolutions per model.
    check_sizes: tuple[dict[str, int], ...]

    @property
    def max_batch_size(self) -> int:
        return self.axes["batch"].max

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def text_encoder_spec(name: str, hidden_size: int, pooled_size: int, max_batch: int = 16) -> ModelSpec:
    """CLIP text encoder: token ids -> last and penultimate hidden states and the pooled embedding.

    ``pooled`` is the projected ``text_embeds`` for a ``CLIPTextModelWithProjection`` (SDXL's second
    encoder) and ``pooler_output`` for a plain ``CLIPTextModel``.
    """
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int32", ("batch", TOKEN_LENGTH)),),
        outputs=(
            TensorSpec("last_hidden_state", "float32", ("batch", TOKEN_LENGTH, hidden_size)),
            TensorSpec("penultimate_hidden_state", "float32", ("batch", TOKEN_LENGTH, hidden_size)),
            TensorSpec("pooled", "float32", ("batch", pooled_size)),
        ),
        axes={"batch": AxisRange(1, 2, max_batch)},
        check_sizes=({"batch": 1}, {"batch": 3}),
    )


def unet_spec(
    *,
    in_channels: int,
    out_channels: int,
    cross_attention_dim: int,
    latent_range: AxisRange,
    text_embeds_dim: int | None = None,
    max_batch: int = 16,
) -> ModelSpec:
    """UNet: one denoising step for a batch of rows, each with its own timestep.

    ``text_embeds_dim`` set means an SDXL-style UNet with ``text_embeds`` and ``time_ids`` inputs.
    """
    inputs = [
        TensorSpec("sample", "float32", ("batch", in_channels, "height", "width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", TOKEN_LENGTH, cross_attention_dim)),
    ]
    if text_embeds_dim is not None:
        inputs += [
            TensorSpec("text_embeds", "float32", ("batch", text_embeds_dim)),
            TensorSpec("time_ids", "float32", ("batch", 6)),
        ]
    small, tall, wide = _check_sides(latent_range)
    return ModelSpec(
        name=UNET,
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", out_channels, "height", "width")),),
        axes={"batch": AxisRange(1, 2, max_batch), "height": latent_range, "width": latent_range},
        check_sizes=(
            {"batch": 1, "height": small, "width": small},
            {"batch": 3, "height": tall, "width": wide},
        ),
    )


def vae_decoder_spec(
    *, latent_channels: int, scale_factor: int, latent_range: AxisRange, max_batch: int = 8
) -> ModelSpec:
    """VAE decoder: raw latents -> images in [0, 1], NCHW (the scaling and denormalisation are inside)."""
    small, tall, wide = _check_sides(latent_range)
    return ModelSpec(
        name=VAE_DECODER,
        inputs=(TensorSpec("latent", "float32", ("batch", latent_channels, "height", "width")),),
        outputs=(TensorSpec("images", "float32", ("batch", 3, "image_height", "image_width")),),
        axes={
            "batch": AxisRange(1, 1, max_batch),
            "height": latent_range,
            "width": latent_range,
            "image_height": _scaled(latent_range, scale_factor),
            "image_width": _scaled(latent_range, scale_factor),
        },
        check_sizes=(
            {"batch": 1, "height": small, "width": small},
            {"batch": 2, "height": tall, "width": wide},
        ),
    )


def _scaled(r: AxisRange, factor: int) -> AxisRange:
    return AxisRange(r.min * factor, r.opt * factor, r.max * factor)


def _check_sides(r: AxisRange) -> tuple[int, int, int]:
    """The smallest side, and a non-square size whose sides are no multiple of the UNet's up factor."""
    return r.min, min(r.max, r.min + 5), min(r.max, 2 * r.min + 3)


SAFETY_CHECKER = "safety_checker"


def safety_checker_spec(image_size: int = 224, max_batch: int = 8) -> ModelSpec:
    """Safety checker: CLIP-preprocessed images -> ``has_nsfw``, 1.0 for a flagged image, else 0.0.

    ``pixel_values`` is what ``CLIPImageProcessor`` gives for the generated images (resized, centre
    cropped to ``image_size``, normalised with CLIP's mean and std).  ``has_nsfw`` is one float per row
    (sent back by Triton as [batch, 1]); see :mod:`export.safety`.
    """
    return ModelSpec(
        name=SAFETY_CHECKER,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size)),),
        outputs=(TensorSpec("has_nsfw", "float32", ("batch",)),),
        axes={"batch": AxisRange(1, 1, max_batch)},
        check_sizes=({"batch": 1}, {"batch": 3}),
    )
