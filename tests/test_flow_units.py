"""SD3 / FLUX pieces without Triton: tiny models, T5 tokenizer, specs, export layout, rules, prompts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from transformers import T5TokenizerFast
from tritonclient.grpc import model_config_pb2 as mc

from export.contract import specs
from export.models.source import ModelSource
from export.models.tokenizer import T5_VOCAB_SIZE, write_t5_tokenizer
from server.errors import BadRequest
from server.pipeline.model import DiffusionModel
from server.pipeline.rules import apply_rule, rule_for


def test_t5_tokenizer_trained_in_code(tmp_path: Path) -> None:
    write_t5_tokenizer(tmp_path, model_max_length=256)
    tok = T5TokenizerFast.from_pretrained(tmp_path)
    assert len(tok) == T5_VOCAB_SIZE and tok.model_max_length == 256
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(["a photo of a cat"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    end = ids.index(1)
    assert 3 <= end < 16 and all(i > 2 for i in ids[:end]) and ids[end + 1 :] == [0] * (15 - end)
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    long = tok(["cat " * 600], padding="max_length", max_length=512, truncation=True).input_ids[0]
    assert len(long) == 512 and long[-1] == 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_models_have_the_real_families_traits(family: str, tiny_model: Callable[[str], Path]) -> None:
    source = ModelSource(tiny_model(family))
    assert source.family.flow_matching and source.denoiser == "transformer"
    assert source.latent_channels == 16 and source.size_multiple == 16
    vae = source.config("vae")
    assert vae["shift_factor"] is not None and not vae["use_quant_conv"]
    if family == "sd3":
        assert source.text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")
        assert source.t5_encoders == ("text_encoder_3",)
        assert source.config("scheduler")["shift"] == 3.0
    else:
        assert source.text_encoders == ("text_encoder", "text_encoder_2")
        assert source.config("transformer")["guidance_embeds"] is True
        assert source.config("scheduler")["use_dynamic_shifting"] is True


@pytest.mark.parametrize(
    ("family", "inputs"),
    [
        ("sd3", ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"]),
        (
            "flux",
            [
                "hidden_states",
                "timestep",
                "encoder_hidden_states",
                "pooled_projections",
                "img_ids",
                "txt_ids",
                "guidance",
            ],
        ),
    ],
)
def test_exported_repository(family: str, inputs: list[str], repository: Callable[[str], Path]) -> None:
    repo = repository(family)
    config = text_format.Parse((repo / "transformer" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [i.name for i in config.input] == inputs
    assert [o.name for o in config.output] == ["noise_pred"]
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    t5_config = text_format.Parse((repo / t5 / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(t5_config.input[0].dims) == [-1]  # the token axis follows max_sequence_length
    vae = text_format.Parse((repo / "vae_decoder" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(vae.input[0].dims) == [16, -1, -1]


def test_vae_decoder_applies_scaling_and_shift(tiny_model: Callable[[str], Path]) -> None:
    from diffusers import AutoencoderKL

    from export.models.modules import VaeDecoderModule

    vae = AutoencoderKL.from_pretrained(tiny_model("sd3"), subfolder="vae").eval()
    latent = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        got = VaeDecoderModule(vae)(latent)
        raw = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(got, (raw / 2 + 0.5).clamp(0, 1))


def test_t5_spec_check_inputs_stay_in_the_vocabulary() -> None:
    from export.toolchain.onnx_export import example_inputs

    spec = specs.t5_encoder_spec("text_encoder_3", 64, vocab_size=1100)
    for sizes in spec.check_sizes:
        ids = example_inputs(spec, sizes)["input_ids"]
        assert (
            ids.shape == (sizes["batch"], sizes["sequence"]) and ids.max() < 1100 and (ids[:, -1] == 1).all()
        )


@pytest.mark.parametrize(
    ("model_id", "guidance", "steps", "max_sequence_length"),
    [
        ("black-forest-labs/FLUX.1-schnell", 0.0, 4, 256),
        ("black-forest-labs/FLUX.1-dev", 3.5, 50, 512),
        ("stabilityai/stable-diffusion-3-medium-diffusers", 3.5, 50, None),
        ("stabilityai/stable-diffusion-3.5-large-turbo", 0.0, 4, None),
    ],
)
def test_rules(model_id: str, guidance: float, steps: int, max_sequence_length: int | None) -> None:
    rule = rule_for(model_id)
    assert apply_rule(rule, 3.5, 0) == (guidance, steps)
    assert rule.max_sequence_length == max_sequence_length
    assert apply_rule(rule, 3.5, 7)[1] == 7  # a requested step count is kept


def test_prompt_parts_and_sequence_length(tiny_model: Callable[[str], Path]) -> None:
    sd3 = DiffusionModel(ModelSource(tiny_model("sd3")))
    assert [t.max_length for t in sd3.tokenizers] == [77, 77, 256]  # CLIP, CLIP, T5
    positive, negative = sd3.prompts("a | b", "")
    assert positive.parts == ("a", "b", "a") and negative.parts == (None, None, None)
    assert sd3.tokenize(2, ["a cat"]).shape == (1, 256)
    assert sd3.tokenize(0, ["a cat"]).shape == (1, 77)
    with pytest.raises(BadRequest, match="prompt has 4 parts"):
        sd3.prompts("a|b|c|d", "")
    flux = DiffusionModel(ModelSource(tiny_model("flux")), rule=rule_for("FLUX.1-schnell"))
    assert [t.max_length for t in flux.tokenizers] == [77, 256] and flux.tokenize(1, ["a"]).shape == (1, 256)
    assert flux.prompts("a", "x|y|z")[0].parts == ("a", "a")  # FLUX ignores its negative prompt


def test_flow_models_refuse_a_non_flow_scheduler(tiny_model: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match="needs a flow-matching scheduler"):
        DiffusionModel(ModelSource(tiny_model("sd3")), "EulerAncestralDiscreteScheduler")
    with pytest.raises(ValueError, match="needs a flow-matching scheduler"):
        DiffusionModel(ModelSource(tiny_model("flux")), "FlowMatchHeunDiscreteScheduler")  # takes no sigmas
    assert DiffusionModel(ModelSource(tiny_model("sd3")), "FlowMatchHeunDiscreteScheduler").max_side == 1024
