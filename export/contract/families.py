"""Model families: what SD, SDXL, SD3 and FLUX differ in, one descriptor each (docs/ARCHITECTURE.md,
section 4).

diffusers names a folder's pipeline in ``model_index.json``'s ``_class_name`` (``StableDiffusionXLPipeline``,
``FluxPipeline``...), and that class fixes the rest: which text encoders of which kind, which denoiser,
what the denoiser is conditioned on, how the latents are laid out and which numerical rules apply.  The
exporter and the service ask a :class:`ModelFamily` for those facts; the sizes (channels, hidden widths,
sample sizes) stay in each component's own config.  Adding a family is adding a descriptor to
:data:`FAMILIES` (and, where it needs a new kind of module or loop, that module or loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from export.contract.specs import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, TRANSFORMER, UNET, AxisRange

# Text encoder kinds, as diffusers' pipelines load them: ``CLIPTextModel`` (pooled: its pooler output),
# ``CLIPTextModelWithProjection`` (pooled: the projected ``text_embeds``), ``T5EncoderModel``.
EncoderKind = Literal["clip", "clip-projection", "t5"]
CLIP: Final = "clip"
CLIP_PROJECTION: Final = "clip-projection"
T5: Final = "t5"

# How the denoiser's ``encoder_hidden_states`` are made from the text encoders' outputs:
# - "last": the first encoder's last hidden state (SD);
# - "penultimate": every encoder's penultimate hidden state, side by side (SDXL);
# - "joint": the CLIP encoders' penultimate hidden states side by side, padded to T5's width, then T5's
#   tokens after them (SD3);
# - "t5": T5's last hidden state alone (FLUX).
HiddenStates = Literal["last", "penultimate", "joint", "t5"]


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder: its diffusers subfolder (also its Triton model), its kind, and whether its
    pooled output is (part of) the pooled conditioning."""

    name: str
    kind: EncoderKind
    pooled: bool = False

    @property
    def tokenizer(self) -> str:
        """The tokenizer folder that goes with it (``text_encoder_2`` -> ``tokenizer_2``)."""
        return self.name.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser takes besides the latents and the timestep."""

    hidden: HiddenStates
    # The denoiser input that takes the pooled embeddings (the pooled outputs of the encoders marked
    # ``pooled``, side by side): SDXL's ``text_embeds``, SD3's and FLUX's ``pooled_projections``.
    pooled: str | None = None
    # SDXL's micro-conditioning ``time_ids``: (original size, crop (0, 0), target size).
    time_ids: bool = False
    # The guidance scale as an embedding, where the transformer's config says ``guidance_embeds``
    # (FLUX.1-dev).
    guidance_embedding: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """One family of text-to-image pipelines, as diffusers runs it."""

    name: Literal["sd", "sdxl", "sd3", "flux"]
    pipelines: frozenset[str]  # the ``_class_name`` values of model_index.json that are this family
    text_encoders: tuple[TextEncoder, ...]
    denoiser: str  # the diffusers subfolder, also the Triton model: UNET or TRANSFORMER
    denoiser_class: str  # the diffusers class of the denoiser
    conditioning: Conditioning
    # The loop: flow matching (a FlowMatch scheduler, server/pipeline/flow.py) or the UNet loop.
    flow_matching: bool = False
    # The pipeline passes its own sigmas to ``set_timesteps`` and always shifts them by the image
    # sequence length (FluxPipeline); otherwise the scheduler's own, shifted only with dynamic shifting.
    sets_sigmas: bool = False
    # Classifier-free guidance with a negative prompt (FLUX has none: it ignores its negative prompt).
    classifier_free_guidance: bool = True
    # Latent pixels per token side that the pipeline packs itself, with their image ids (FLUX: 2x2);
    # 1: the denoiser takes the latents as they are (SD3's transformer patches them itself).
    latent_packing: int = 1
    # More ``|``-separated prompt parts than text encoders is refused (otherwise the last encoder gets
    # the rest of the text).
    strict_prompt_parts: bool = False
    # T5 tokens per prompt when the model rule names none (the pipeline's ``max_sequence_length``).
    t5_length: int = 0
    # The transformer's position embedding holds ``pos_embed_max_size`` patches a side: larger images
    # are refused and the export's latent range ends there (SD3).
    pos_embed_limit: bool = False
    # The export's latent side range when the config gives none to derive it from (FLUX: 64 to 2048
    # pixels, 1024, FLUX's default, optimal); None: from the denoiser's ``sample_size``.
    latent_range: AxisRange | None = None
    # The precision the denoiser is exported in when fp16 is asked (FLUX's transformer: bf16).
    denoiser_fp16: Literal["fp16", "bf16"] = "fp16"
    # The pipeline runs the VAE in fp32 when vae/config.json says ``force_upcast`` (default true): SDXL's.
    vae_force_upcast: bool = False
    # The pipeline takes model_index.json's ``force_zeros_for_empty_prompt`` (default true): zeros for
    # the negative embeddings when no negative prompt is given (SDXL).
    force_zeros_option: bool = False

    @property
    def packs_latents(self) -> bool:
        return self.latent_packing > 1

    @property
    def t5_encoders(self) -> tuple[str, ...]:
        """The text encoders that are T5; the others are CLIP."""
        return tuple(e.name for e in self.text_encoders if e.kind == T5)


SD: Final = ModelFamily(
    name="sd",
    pipelines=frozenset({"StableDiffusionPipeline"}),
    text_encoders=(TextEncoder(TEXT_ENCODER, CLIP),),
    denoiser=UNET,
    denoiser_class="UNet2DConditionModel",
    conditioning=Conditioning(hidden="last"),
)
SDXL: Final = ModelFamily(
    name="sdxl",
    pipelines=frozenset({"StableDiffusionXLPipeline"}),
    text_encoders=(
        TextEncoder(TEXT_ENCODER, CLIP),
        TextEncoder(TEXT_ENCODER_2, CLIP_PROJECTION, pooled=True),
    ),
    denoiser=UNET,
    denoiser_class="UNet2DConditionModel",
    conditioning=Conditioning(hidden="penultimate", pooled="text_embeds", time_ids=True),
    vae_force_upcast=True,
    force_zeros_option=True,
)
# The transformer families, with flow matching.
SD3: Final = ModelFamily(
    name="sd3",
    pipelines=frozenset({"StableDiffusion3Pipeline"}),
    text_encoders=(
        TextEncoder(TEXT_ENCODER, CLIP_PROJECTION, pooled=True),
        TextEncoder(TEXT_ENCODER_2, CLIP_PROJECTION, pooled=True),
        TextEncoder(TEXT_ENCODER_3, T5),
    ),
    denoiser=TRANSFORMER,
    denoiser_class="SD3Transformer2DModel",
    conditioning=Conditioning(hidden="joint", pooled="pooled_projections"),
    flow_matching=True,
    strict_prompt_parts=True,
    t5_length=256,
    pos_embed_limit=True,
)
FLUX: Final = ModelFamily(
    name="flux",
    pipelines=frozenset({"FluxPipeline"}),
    text_encoders=(TextEncoder(TEXT_ENCODER, CLIP, pooled=True), TextEncoder(TEXT_ENCODER_2, T5)),
    denoiser=TRANSFORMER,
    denoiser_class="FluxTransformer2DModel",
    conditioning=Conditioning(hidden="t5", pooled="pooled_projections", guidance_embedding=True),
    flow_matching=True,
    sets_sigmas=True,
    classifier_free_guidance=False,
    latent_packing=2,
    strict_prompt_parts=True,
    t5_length=512,
    latent_range=AxisRange(8, 128, 256),
    denoiser_fp16="bf16",
)

FAMILIES: Final[tuple[ModelFamily, ...]] = (SD, SDXL, SD3, FLUX)
SUPPORTED_PIPELINES: Final = frozenset(p for family in FAMILIES for p in family.pipelines)


def family_for(model_index: Mapping[str, Any]) -> ModelFamily | None:
    """The family of the diffusers folder whose ``model_index.json`` is ``model_index``: its pipeline
    class (``_class_name``) names it, as it names the class diffusers loads; None if unsupported."""
    pipeline = str(model_index.get("_class_name", ""))
    return next((family for family in FAMILIES if pipeline in family.pipelines), None)
