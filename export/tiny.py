"""Tiny random-weight SD 1.5 / SDXL / SD3 / FLUX diffusers folders, built in code for tests.

See docs/ARCHITECTURE.md section 4.

Nothing is downloaded: the architectures are diffusers' test-size configs, weights are the default
random initialisation under fixed seeds (``torch.manual_seed`` before each component), and the
CLIP tokenizer files come from :mod:`export.tokenizer`. The result is a normal diffusers folder
(``pipeline.save_pretrained``), so ``StableDiffusionPipeline.from_pretrained(dir)`` /
``StableDiffusionXLPipeline.from_pretrained(dir)`` and the export code load it like a real model.

Shapes follow the real models where the service depends on them: 77-token CLIP inputs with the real
vocabulary (49408), 4 latent channels, VAE scale factor 8 (4 VAE blocks), SDXL's two encoders with
pooled ``text_embeds`` and 6 ``time_ids``. Hidden sizes are tiny (32/64 channels), so a 64x64 image
takes well under a second on CPU. The default init gives non-constant images (no weight scaling
is needed; see :func:`generate_image`).

CLI: ``t2i-tiny --family sd --out models/tiny-sd``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast, get_args

from export.tokenizer import EOS_TOKEN, write_clip_tokenizer

if TYPE_CHECKING:
    import numpy as np
    from diffusers import AutoencoderKL

__all__ = [
    "HUB_LAYOUTS",
    "MARKER_FILE",
    "TINY_MODEL_VERSION",
    "Family",
    "build_tiny_model",
    "generate_image",
    "is_complete",
    "main",
    "save_as_hub",
]

logger = logging.getLogger(__name__)

Family = Literal["sd", "sdxl", "sd3", "flux", "flux-schnell"]
FAMILIES: Final[tuple[str, ...]] = get_args(Family)

# Bump whenever anything below changes the saved files (configs, seeds, init, tokenizer layout):
# build_tiny_model() rebuilds folders whose marker carries another version.
TINY_MODEL_VERSION: Final = "3"
MARKER_FILE: Final = "tiny_model.json"
# One seed per component (torch.manual_seed before each). Distinct seeds keep SDXL's two text
# encoders from sharing their weights, so code that swaps them gives visibly different outputs.
SEEDS: Final[dict[str, int]] = {
    "unet": 0,
    "vae": 1,
    "text_encoder": 2,
    "text_encoder_2": 3,
    "text_encoder_3": 4,
    "transformer": 5,
}

_SUBFOLDERS: Final[dict[str, tuple[str, ...]]] = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sd3": (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "flux-schnell": (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ),
}
_PIPELINE_CLASS: Final[dict[str, str]] = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}

# Shared by both families: 4 blocks, so the VAE scale factor is 8 as in the real models.
_VAE_CONFIG: Final[dict[str, Any]] = {
    "block_out_channels": (8, 16, 32, 32),
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "sample_size": 64,
}
_TEXT_CONFIG: Final[dict[str, Any]] = {
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
_UNET_COMMON: Final[dict[str, Any]] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
}
# SD 1.5 / SDXL scheduler configs as published with the real models.
_SD_SCHEDULER: Final[dict[str, Any]] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
_SDXL_SCHEDULER: Final[dict[str, Any]] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
}


# SD3 / FLUX: a 16-channel VAE without quant convs, its latents scaled and shifted (the real models'
# factors), 4 blocks so the scale factor is 8; with the transformers' 2x2 patches, sides are
# multiples of 16 as in the real models.
_VAE16_CONFIG: Final[dict[str, Any]] = {
    **_VAE_CONFIG,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_VAE16_FACTORS: Final[dict[str, dict[str, float]]] = {
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
}
# T5 v1.1 (gated GELU) as SD3 and FLUX use it, at test size; d_model is the transformer's
# joint_attention_dim.
_T5_CONFIG: Final[dict[str, Any]] = {
    "d_ff": 37,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "is_encoder_decoder": False,
    "tie_word_embeddings": False,
}
# SD3 medium's published scheduler config; FLUX.1-dev's (dynamic shifting) and schnell's.
_SD3_SCHEDULER: Final[dict[str, Any]] = {"num_train_timesteps": 1000, "shift": 3.0}
_FLUX_DEV_SCHEDULER: Final[dict[str, Any]] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_FLUX_SCHNELL_SCHEDULER: Final[dict[str, Any]] = {
    **_FLUX_DEV_SCHEDULER,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


class _SavablePipeline(Protocol):
    """The part of ``diffusers.DiffusionPipeline`` used here.

    mypy resolves ``from diffusers import StableDiffusionPipeline`` to diffusers' dummy placeholder
    classes (its ``TYPE_CHECKING`` import branch), which lack the real methods; hence the casts.
    """

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, safe_serialization: bool
    ) -> None: ...


def _check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family  # type: ignore[return-value]


def _vae(scaling_factor: float, *, force_upcast: bool) -> AutoencoderKL:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEEDS["vae"])
    return AutoencoderKL(**_VAE_CONFIG, scaling_factor=scaling_factor, force_upcast=force_upcast)


def _build_sd_pipeline(tmp: Path) -> _SavablePipeline:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEEDS["unet"])
    unet = UNet2DConditionModel(**_UNET_COMMON, cross_attention_dim=32)
    vae = _vae(0.18215, force_upcast=True)
    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_CONFIG, hidden_act="quick_gelu"))
    write_clip_tokenizer(tmp / "tokenizer", pad_token=EOS_TOKEN)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    scheduler = PNDMScheduler(**_SD_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    return cast("_SavablePipeline", pipe)


def _build_sdxl_pipeline(tmp: Path) -> _SavablePipeline:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    time_embed_dim = 8
    pooled_dim = _TEXT_CONFIG["projection_dim"]  # text_encoder_2's text_embeds
    torch.manual_seed(SEEDS["unet"])
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,  # 6 time_ids + pooled
        cross_attention_dim=2 * _TEXT_CONFIG["hidden_size"],  # both encoders' hidden states, concatenated
    )
    vae = _vae(0.13025, force_upcast=False)
    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_CONFIG, hidden_act="gelu"))
    torch.manual_seed(SEEDS["text_encoder_2"])
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_CONFIG, hidden_act="gelu"))
    write_clip_tokenizer(tmp / "tokenizer", pad_token=EOS_TOKEN)
    write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    scheduler = EulerDiscreteScheduler(**_SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return cast("_SavablePipeline", pipe)


def _t5_encoder(d_model: int) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    from export.tokenizer import T5_VOCAB_SIZE

    torch.manual_seed(SEEDS["text_encoder_3"])
    return T5EncoderModel(T5Config(**_T5_CONFIG, vocab_size=T5_VOCAB_SIZE, d_model=d_model))


def _vae16(family: str) -> AutoencoderKL:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEEDS["vae"])
    return AutoencoderKL(**_VAE16_CONFIG, **_VAE16_FACTORS[family], force_upcast=False)


def _build_sd3_pipeline(tmp: Path) -> _SavablePipeline:
    """diffusers' SD3 test transformer with real-model traits: 16 channels, 2x2 patches, 2 layers.

    Two CLIP encoders with projection (pooled: 2 x 32 = 64), T5 with d_model 64 = joint_attention_dim
    (CLIP's 2 x 32 hidden states are padded to it, as in the real model).
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer

    from export.tokenizer import write_t5_tokenizer

    torch.manual_seed(SEEDS["transformer"])
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_CONFIG["projection_dim"],
        out_channels=16,
        pos_embed_max_size=64,
    )
    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_CONFIG, hidden_act="gelu"))
    torch.manual_seed(SEEDS["text_encoder_2"])
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_CONFIG, hidden_act="gelu"))
    text_encoder_3 = _t5_encoder(64)
    write_clip_tokenizer(tmp / "tokenizer", pad_token=EOS_TOKEN)
    write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
    write_t5_tokenizer(tmp / "tokenizer_3", model_max_length=256)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_SCHEDULER),
        vae=_vae16("sd3"),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=T5Tokenizer.from_pretrained(tmp / "tokenizer_3"),
    )
    return cast("_SavablePipeline", pipe)


def _build_flux_pipeline(tmp: Path, *, guidance_embeds: bool) -> _SavablePipeline:
    """diffusers' FLUX test transformer with real-model traits: 16 latent channels packed 2x2 (64 in).

    ``guidance_embeds`` True is a FLUX.1-dev-like model (guidance through its embedding, dynamic
    shifting), False a schnell-like one. CLIP without projection (pooled: its pooler output, 32),
    T5 with d_model 32 = joint_attention_dim.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Tokenizer

    from export.tokenizer import write_t5_tokenizer

    torch.manual_seed(SEEDS["transformer"])
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=_TEXT_CONFIG["hidden_size"],
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_CONFIG, hidden_act="quick_gelu"))
    text_encoder_2 = _t5_encoder(32)
    write_clip_tokenizer(tmp / "tokenizer", pad_token=EOS_TOKEN)
    write_t5_tokenizer(tmp / "tokenizer_2", model_max_length=512 if guidance_embeds else 256)
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(_FLUX_DEV_SCHEDULER if guidance_embeds else _FLUX_SCHNELL_SCHEDULER)
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae16("flux"),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5Tokenizer.from_pretrained(tmp / "tokenizer_2"),
    )
    return cast("_SavablePipeline", pipe)


_BUILDERS: Final[dict[str, Any]] = {
    "sd": _build_sd_pipeline,
    "sdxl": _build_sdxl_pipeline,
    "sd3": _build_sd3_pipeline,
    "flux": lambda tmp: _build_flux_pipeline(tmp, guidance_embeds=True),
    "flux-schnell": lambda tmp: _build_flux_pipeline(tmp, guidance_embeds=False),
}


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(model_dir: Path, family: Family) -> bool:
    """True if ``model_dir`` holds a tiny ``family`` model built by this code version."""
    model_dir = Path(model_dir)
    marker = _read_marker(model_dir)
    if marker is None or marker.get("version") != TINY_MODEL_VERSION or marker.get("family") != family:
        return False
    if not (model_dir / "model_index.json").is_file():
        return False
    return all((model_dir / sub).is_dir() for sub in _SUBFOLDERS[family])


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("torch", "diffusers", "transformers", "tokenizers", "open_clip_torch", "sentencepiece"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _fresh_dir(out_dir: Path, what: str) -> Path:
    """A new empty hidden folder beside ``out_dir`` (same filesystem, so renames are atomic).

    Not ``tempfile.mkdtemp``: its 0700 mode would end up on the installed model folder.
    """
    path = out_dir.parent / f".{out_dir.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def build_tiny_model(family: Family, out_dir: Path) -> Path:
    """Build the tiny ``family`` model into ``out_dir`` (a diffusers folder) and return ``out_dir``.

    Idempotent: when ``out_dir`` already holds a complete model from this code version (marker file
    ``tiny_model.json`` with :data:`TINY_MODEL_VERSION`), nothing is done. Otherwise the model is
    built in a temporary folder beside ``out_dir`` and renamed into place, so readers never see a
    half-written folder. An existing ``out_dir`` is replaced only if it is empty or holds a tiny
    model (another version or family); anything else raises ``FileExistsError``.
    """
    family = _check_family(family)
    out_dir = Path(out_dir)
    if is_complete(out_dir, family):
        logger.info("tiny %s model already built at %s (version %s)", family, out_dir, TINY_MODEL_VERSION)
        return out_dir
    _check_replaceable(out_dir)

    import torch

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = _fresh_dir(out_dir, "building")
    try:
        # Keep the caller's global RNG state: the build reseeds torch for every component.
        with torch.random.fork_rng(devices=[]):
            pipe = _BUILDERS[family](tmp)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if family == "sd":
            # SD 1.5 ships a safety checker; so does its tiny stand-in (never flags the tiny model's images).
            from export.safety import build_tiny_safety_checker

            build_tiny_safety_checker(tmp)
        marker = {
            "family": family,
            "version": TINY_MODEL_VERSION,
            "pipeline": _PIPELINE_CLASS[family],
            "seeds": SEEDS,
            "built_with": _versions(),
        }
        # Written last: its presence means every other file is complete.
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out_dir, family)
    finally:
        _remove_tree(tmp)
    logger.info("built tiny %s model at %s in %.1f s", family, out_dir, time.perf_counter() - started)
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a file or a folder that is not ours (e.g. a real model passed by mistake)."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    is_real_dir = out_dir.is_dir() and not out_dir.is_symlink()
    if is_real_dir and (not any(out_dir.iterdir()) or _read_marker(out_dir) is not None):
        return
    raise FileExistsError(
        f"{out_dir} exists and is not a tiny model built by export.tiny (no {MARKER_FILE}); "
        "remove it or choose another --out"
    )


def _install(tmp: Path, out_dir: Path, family: Family) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``, moving an outdated ``out_dir`` aside first."""
    old: Path | None = None
    if out_dir.exists() or out_dir.is_symlink():
        old = _fresh_dir(out_dir, "old")
        os.replace(out_dir, old / "model")
    try:
        os.replace(tmp, out_dir)
    except OSError:
        # Another process installed a model between our check and the rename.
        if not is_complete(out_dir, family):
            raise
        logger.info("another process built %s concurrently; keeping its copy", out_dir)
    finally:
        if old is not None:
            _remove_tree(old)


def generate_image(
    family: Family,
    model_dir: Path,
    *,
    prompt: str = "a photo of a cat",
    steps: int = 2,
    size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Run the diffusers pipeline on ``model_dir`` (CPU, fp32); returns float32 [size, size, 3] in [0, 1]."""
    import diffusers
    import numpy as np
    import torch

    family = _check_family(family)
    pipe: Any
    cls = getattr(diffusers, _PIPELINE_CLASS[family])
    if family == "sd":
        pipe = cls.from_pretrained(model_dir, safety_checker=None)
    else:
        pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    image: np.ndarray = np.asarray(out.images[0], dtype=np.float32)
    return image


HubLayout = Literal["fp32+fp16", "fp16", "bin"]
HUB_LAYOUTS: Final[tuple[str, ...]] = get_args(HubLayout)


def save_as_hub(model_dir: Path, out_dir: Path, layout: HubLayout) -> Path:
    """Save the diffusers folder ``model_dir`` again into ``out_dir`` the way Hub repositories hold it.

    ``"fp32+fp16"``: ``save_pretrained`` then ``.to(torch.float16).save_pretrained(variant="fp16")``,
    full and ``*.fp16.safetensors`` files side by side, and the transformers configs that the last save
    wrote (``"dtype": "float16"``); ``"fp16"``: only the fp16 variant files (and such configs);
    ``"bin"``: only pickled ``.bin`` weights (``safe_serialization=False``; transformers 5 saves only
    safetensors, so its modules' ``pytorch_model.bin`` is ``torch.save`` of the state dict, which is what
    older transformers wrote).  The pipeline's own ``save_pretrained`` writes every other file, as it does
    for repositories on the Hub; the tokenizers are the original folders (``vocab.json`` + ``merges.txt``).
    """
    import diffusers
    import torch

    pipe: Any = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    if layout == "bin":
        pipe.save_pretrained(out_dir, safe_serialization=False)
        for name, module in pipe.components.items():
            safetensors = out_dir / name / "model.safetensors"
            if safetensors.is_file():
                torch.save(module.state_dict(), out_dir / name / "pytorch_model.bin")
                safetensors.unlink()
    else:
        if layout == "fp32+fp16":
            pipe.save_pretrained(out_dir)
        pipe.to(torch.float16).save_pretrained(out_dir, variant="fp16")
    for tokenizer in Path(model_dir).glob("tokenizer*"):
        shutil.rmtree(out_dir / tokenizer.name, ignore_errors=True)
        shutil.copytree(tokenizer, out_dir / tokenizer.name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2i-tiny",
        description="Build a tiny random-weight SD 1.5, SDXL, SD3 or FLUX diffusers folder (no downloads).",
    )
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. models/tiny-sd")
    parser.add_argument(
        "--check",
        action="store_true",
        help="afterwards run 2 pipeline steps at 64x64 and fail if the image is constant",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        out = build_tiny_model(args.family, args.out)
        if args.check:
            image = generate_image(args.family, out)
            std = float(image.std())
            logger.info("check image: shape %s, mean %.3f, std %.3f", image.shape, image.mean(), std)
            if std < 1e-3:
                logger.error("generated image is constant (std %.2g)", std)
                return 1
    except (RuntimeError, OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("%s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
