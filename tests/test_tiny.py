"""Tiny SD 1.5 / SDXL models built in code (export.fixtures.tiny) and the offline CLIP tokenizer
(export.models.tokenizer)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from export.fixtures import tiny
from export.fixtures.tiny import MARKER_FILE, TINY_MODEL_VERSION, build_tiny_model
from export.fixtures.tiny_pipelines import Family
from export.models import tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP vocabulary
FAMILIES: tuple[Family, ...] = ("sd", "sdxl")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / f"tiny-{family}") for family in FAMILIES}


def _snapshot(model_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(model_dir)): p.stat().st_mtime_ns for p in model_dir.rglob("*")}


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_tokenizer_files(tmp_path: Path, pad: str) -> None:
    tokenizer.write_clip_tokenizer(tmp_path, pad_token=pad)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407

    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 49406)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 49407)
    pad_id = 49407 if pad == "<|endoftext|>" else 0
    assert (tok.pad_token, tok.pad_token_id) == (pad, pad_id)

    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert ids.input_ids == CAT_IDS + [pad_id] * (77 - len(CAT_IDS))
    assert tok("A  Photo of a CAT").input_ids == CAT_IDS  # lower-cased, whitespace collapsed
    long = tok("cat " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_missing_open_clip_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps open_clip_torch==3\.3\.0"):
        tokenizer.bpe_vocab_path()


def test_model_tokenizers(models: dict[str, Path]) -> None:
    sd_tok = CLIPTokenizer.from_pretrained(models["sd"] / "tokenizer")
    assert sd_tok("a photo of a cat").input_ids == CAT_IDS and sd_tok.pad_token_id == 49407
    tok_1 = CLIPTokenizer.from_pretrained(models["sdxl"] / "tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(models["sdxl"] / "tokenizer_2")
    assert tok_1.pad_token_id == 49407
    assert (tok_2.pad_token, tok_2.pad_token_id) == ("!", 0)
    ids_2 = tok_2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids_2 == CAT_IDS + [0] * 70


# --- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_generates_deterministic_images(models: dict[str, Path], family: Family) -> None:
    marker = json.loads((models[family] / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["family"] == family and marker["version"] == TINY_MODEL_VERSION

    image = tiny.generate_image(family, models[family])
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05, "image is (nearly) constant"
    assert (image <= 0.0).mean() < 0.1 and (image >= 1.0).mean() < 0.1, "VAE output saturates"
    np.testing.assert_array_equal(tiny.generate_image(family, models[family]), image)
    assert np.abs(tiny.generate_image(family, models[family], seed=1) - image).mean() > 0.01


def test_model_configs(models: dict[str, Path]) -> None:
    def config(family: str, sub: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((models[family] / sub / "config.json").read_text(encoding="utf-8"))
        return data

    for family in FAMILIES:
        vae = config(family, "vae")
        assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
        assert vae["latent_channels"] == 4
    assert config("sd", "vae")["scaling_factor"] == 0.18215
    assert config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert config("sdxl", "vae")["force_upcast"] is False
    assert config("sd", "unet")["cross_attention_dim"] == 32
    unet_xl = config("sdxl", "unet")
    assert unet_xl["cross_attention_dim"] == 64 and unet_xl["addition_embed_type"] == "text_time"
    assert (
        unet_xl["projection_class_embeddings_input_dim"]
        == 6 * 8 + config("sdxl", "text_encoder_2")["projection_dim"]
    )
    index = json.loads((models["sdxl"] / "model_index.json").read_text(encoding="utf-8"))
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    sd_index = json.loads((models["sd"] / "model_index.json").read_text(encoding="utf-8"))
    assert sd_index["scheduler"] == ["diffusers", "PNDMScheduler"]
    # SD 1.5's stand-in carries a tiny safety checker (export/models/safety.py), as SD 1.5 does.
    assert sd_index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert sd_index["feature_extractor"][1] == "CLIPImageProcessor"

    # Distinct seeds: SDXL's two text encoders must not share weights.
    te1 = load_file(models["sdxl"] / "text_encoder" / "model.safetensors")
    te2 = load_file(models["sdxl"] / "text_encoder_2" / "model.safetensors")
    # transformers 5 saves CLIPTextModel without the "text_model." prefix, the projection model with it.
    (emb1,) = (v for k, v in te1.items() if k.endswith("embeddings.token_embedding.weight"))
    (emb2,) = (v for k, v in te2.items() if k.endswith("embeddings.token_embedding.weight"))
    assert emb1.shape == emb2.shape == (49408, 32)
    assert not torch.equal(emb1, emb2)


@pytest.mark.parametrize("family", FAMILIES)
def test_second_build_is_a_noop(
    models: dict[str, Path], family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(models[family])

    def fail(family: str, tmp: Path) -> None:
        raise AssertionError("rebuilt a complete model")

    monkeypatch.setattr(tiny, "build_pipeline", fail)
    assert build_tiny_model(family, models[family]) == models[family]
    assert tiny.main(["--family", family, "--out", str(models[family])]) == 0
    assert _snapshot(models[family]) == before
    assert not [p for p in models[family].parent.iterdir() if p.name.startswith(".")], "temp dirs left"


def test_outdated_model_is_rebuilt_identically(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tiny-sd"
    shutil.copytree(models["sd"], out)
    marker = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
    (out / MARKER_FILE).write_text(json.dumps({**marker, "version": "outdated"}), encoding="utf-8")
    (out / "stale.txt").write_text("from an older build", encoding="utf-8")

    rng = torch.get_rng_state()
    assert build_tiny_model("sd", out) == out
    assert torch.equal(torch.get_rng_state(), rng), "build must not move the caller's RNG"
    assert json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))["version"] == TINY_MODEL_VERSION
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"], "temp dirs left"
    # Fixed seeds: a rebuild gives the same weights.
    for sub in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        old, new = load_file(models["sd"] / sub), load_file(out / sub)
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old)


def test_refuses_to_replace_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "real-model"
    out.mkdir()
    (out / "model_index.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError):
        build_tiny_model("sd", out)
    assert tiny.main(["--family", "sd", "--out", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("sd4", tmp_path / "x")  # type: ignore[arg-type]
