"""One I/O spec per Triton model: names, dtypes, dynamic axes and min/opt/max sizes.

The same spec drives the ONNX export (input/output names, dynamic axes), the verification shapes,
the TensorRT optimisation profiles and the generated ``config.pbtxt``.  The service speaks to Triton
with these names too, so they are the single contract between export/ and server/.

Shapes list every axis including the batch axis.  An axis is either a fixed size or the name of a
dynamic axis (``"batch"``, ``"height"``, ``"width"``...); each dynamic axis has a
:class:`AxisRange` on the model spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# A LoRA variant of a model, named to Triton: the request parameter that carries its key, and the key's
# form (a hex digest of the sorted LoRA set; also the variant's file name, so nothing else may pass).
VARIANT_PARAMETER = "lora_variant"
VARIANT_KEY = re.compile(r"^[0-9a-f]{16,64}$")
# tensorrt: variant K of model M is the Triton model M__K.
VARIANT_SEPARATOR = "__"
# The folder of a model directory that holds its variants' override files.
VARIANTS_DIR = "variants"
# The folder of a python-torch model's version directory that holds the diffusers module's weights.
SOURCE_DIR = "source"

# Model names inside a generated Triton repository.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODER_3 = "text_encoder_3"
UNET = "unet"
TRANSFORMER = "transformer"
VAE_DECODER = "vae_decoder"

# Files of a generated repository the service reads: the repository's list of models (and engine
# buckets), and each model folder's export record.
MANIFEST_FILE = "t2i-repository.json"
FINGERPRINT_FILE = ".export.json"
# The safety checker's CLIP image preprocessing, as transformers' image processors save it.
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The preprocessing every Stable Diffusion release ships with (CLIP's own): what
# ``CLIPImageProcessor()`` defaults to.  Used when a bare checker folder comes without one.
CLIP_PREPROCESSOR_CONFIG: dict[str, object] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}


def serving_tokenizer_file(tokenizer: str) -> str:
    """The repository's file of the model's tokenizer folder ``tokenizer`` (``tokenizer_2``...): a
    ``tokenizers`` JSON set to pad and truncate, which the service loads without transformers."""
    return f"t2i-{tokenizer}.json"


TOKEN_LENGTH = 77
# T5 encoders (SD3, FLUX) take a model-dependent number of tokens (max_sequence_length): 256 for SD3
# and FLUX.1-schnell, 512 for FLUX.1-dev.
T5_TOKEN_RANGE_MAX = 512

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
    # For models whose ``input_ids`` are not CLIP's: the size of their vocabulary (random check inputs).
    vocab_size: int | None = None

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


def t5_encoder_spec(name: str, hidden_size: int, vocab_size: int, max_batch: int = 16) -> ModelSpec:
    """T5 encoder (SD3's ``text_encoder_3``, FLUX's ``text_encoder_2``): ids -> ``last_hidden_state``.

    The token axis is dynamic: each model pads to its own ``max_sequence_length``.
    """
    return ModelSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", hidden_size)),),
        axes={"batch": AxisRange(1, 2, max_batch), "sequence": AxisRange(1, 256, T5_TOKEN_RANGE_MAX)},
        check_sizes=({"batch": 1, "sequence": 256}, {"batch": 3, "sequence": T5_TOKEN_RANGE_MAX}),
        vocab_size=vocab_size,
    )


def sd3_transformer_spec(
    *,
    in_channels: int,
    out_channels: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    latent_range: AxisRange,
    patch_size: int,
    max_batch: int = 16,
) -> ModelSpec:
    """SD3 transformer: one flow-matching step on [B, C, h, w] latents (sides multiples of ``patch_size``).

    ``encoder_hidden_states`` is CLIP's 77 tokens (padded to the T5 width) followed by T5's tokens;
    ``timestep`` is the scheduler's (sigma x 1000), one per row.
    """
    small, tall, wide = _check_sides(latent_range, patch_size)
    text = AxisRange(TOKEN_LENGTH + 1, TOKEN_LENGTH + 256, TOKEN_LENGTH + T5_TOKEN_RANGE_MAX)
    return ModelSpec(
        name=TRANSFORMER,
        inputs=(
            TensorSpec("hidden_states", "float32", ("batch", in_channels, "height", "width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "text_length", joint_attention_dim)),
            TensorSpec("pooled_projections", "float32", ("batch", pooled_projection_dim)),
        ),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", out_channels, "height", "width")),),
        axes={
            "batch": AxisRange(1, 2, max_batch),
            "height": latent_range,
            "width": latent_range,
            "text_length": text,
        },
        check_sizes=(
            {"batch": 1, "height": small, "width": small, "text_length": TOKEN_LENGTH + 256},
            {"batch": 3, "height": tall, "width": wide, "text_length": TOKEN_LENGTH + 64},
        ),
    )


def flux_transformer_spec(
    *,
    in_channels: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    latent_range: AxisRange,
    guidance: bool,
    max_batch: int = 16,
) -> ModelSpec:
    """FLUX transformer: one step on packed latents [B, tokens, 4 x channels] (2x2 latent patches).

    ``img_ids`` / ``txt_ids`` are the rotary position ids of the image and text tokens, per row (the
    model uses the first row's: every row of a batch has the same shape, hence the same ids);
    ``timestep`` is the scheduler's (sigma x 1000); ``guidance`` (guidance-distilled models such as
    FLUX.1-dev) is the guidance scale per row.
    """
    tokens = AxisRange(
        (latent_range.min // 2) ** 2, (latent_range.opt // 2) ** 2, (latent_range.max // 2) ** 2
    )
    small, tall, wide = _check_sides(latent_range, 2)
    inputs = [
        TensorSpec("hidden_states", "float32", ("batch", "image_tokens", in_channels)),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "text_length", joint_attention_dim)),
        TensorSpec("pooled_projections", "float32", ("batch", pooled_projection_dim)),
        TensorSpec("img_ids", "float32", ("batch", "image_tokens", 3)),
        TensorSpec("txt_ids", "float32", ("batch", "text_length", 3)),
    ]
    if guidance:
        inputs.append(TensorSpec("guidance", "float32", ("batch",)))
    return ModelSpec(
        name=TRANSFORMER,
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", "image_tokens", in_channels)),),
        axes={
            "batch": AxisRange(1, 2, max_batch),
            "image_tokens": tokens,
            "text_length": AxisRange(1, 256, T5_TOKEN_RANGE_MAX),
        },
        check_sizes=(
            {"batch": 1, "image_tokens": (small // 2) ** 2, "text_length": T5_TOKEN_RANGE_MAX},
            {"batch": 3, "image_tokens": (tall // 2) * (wide // 2), "text_length": 256},
        ),
    )


# FLUX packs 2x2 latent patches into one image token.
FLUX_PACKING = 2
# The dynamic axes an image size fixes (one TensorRT profile per resolution bucket); every other dynamic
# axis (batch, sequence, text_length) keeps its range in each profile.
RESOLUTION_AXES = ("height", "width", "image_height", "image_width", "image_tokens")


def resolution_sizes(latent_height: int, latent_width: int, vae_scale: int) -> dict[str, int]:
    """The size of each of :data:`RESOLUTION_AXES` for an image of these latent sides."""
    return {
        "height": latent_height,
        "width": latent_width,
        "image_height": latent_height * vae_scale,
        "image_width": latent_width * vae_scale,
        "image_tokens": (latent_height // FLUX_PACKING) * (latent_width // FLUX_PACKING),
    }


def _scaled(r: AxisRange, factor: int) -> AxisRange:
    return AxisRange(r.min * factor, r.opt * factor, r.max * factor)


def _check_sides(r: AxisRange, multiple: int = 1) -> tuple[int, int, int]:
    """The smallest side, and a non-square size whose sides are no multiple of the UNet's up factor.

    With ``multiple`` > 1 (a transformer's patch size) every side is a multiple of it, an odd one.
    """
    if multiple == 1:
        return r.min, min(r.max, r.min + 5), min(r.max, 2 * r.min + 3)
    return r.min, min(r.max, r.min + 3 * multiple), min(r.max, 2 * r.min + multiple)


SAFETY_CHECKER = "safety_checker"


def safety_checker_spec(image_size: int = 224, max_batch: int = 8) -> ModelSpec:
    """Safety checker: CLIP-preprocessed images -> ``has_nsfw``, 1.0 for a flagged image, else 0.0.

    ``pixel_values`` is what ``CLIPImageProcessor`` gives for the generated images (resized, centre
    cropped to ``image_size``, normalised with CLIP's mean and std).  ``has_nsfw`` is one float per row
    (sent back by Triton as [batch, 1]); see :mod:`export.models.safety`.
    """
    return ModelSpec(
        name=SAFETY_CHECKER,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size)),),
        outputs=(TensorSpec("has_nsfw", "float32", ("batch",)),),
        axes={"batch": AxisRange(1, 1, max_batch)},
        check_sizes=({"batch": 1}, {"batch": 3}),
    )
