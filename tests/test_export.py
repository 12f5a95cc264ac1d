"""The export toolchain: generated configs, the ONNX check, the cache, the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.contract.specs import MANIFEST_FILE, serving_tokenizer_file
from export.models.modules import components
from export.models.source import ModelSource, ModelSourceError
from export.toolchain.cli import main as export_main
from export.toolchain.onnx_export import OnnxMismatchError, check_onnx
from export.toolchain.repository import export_repository


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.mark.parametrize(
    ("family", "models"),
    [
        ("sd", {"text_encoder", "unet", "vae_decoder", "safety_checker"}),
        ("sdxl", {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}),
    ],
)
def test_repository_layout_and_configs(
    family: str, models: set[str], repository: Callable[[str], Path]
) -> None:
    repo = repository(family)
    assert {p.name for p in repo.iterdir() if p.is_dir() and "__" not in p.name} == models  # no LoRA variants
    assert json.loads((repo / MANIFEST_FILE).read_text())["models"] == sorted(
        models, key=["text_encoder", "text_encoder_2", "unet", "vae_decoder", "safety_checker"].index
    )
    # The tokenizers the service loads without transformers, one per text encoder.
    tokenizers = {name.replace("text_encoder", "tokenizer") for name in models if name.startswith("text")}
    assert {p.name for p in repo.glob("t2i-tokenizer*.json")} == {
        serving_tokenizer_file(t) for t in tokenizers
    }
    for name in models:
        config = read_config(repo / name)
        assert not config.name  # Triton names it after its folder
        assert config.backend == "python"
        assert config.max_batch_size >= 8
        assert config.HasField("dynamic_batching")
        assert (repo / name / "1" / "model.onnx").is_file()
        assert (repo / name / "1" / "model.py").is_file()
    unet = read_config(repo / "unet")
    inputs = {i.name: i for i in unet.input}
    expected = {"sample", "timestep", "encoder_hidden_states"} | (
        {"text_embeds", "time_ids"} if family == "sdxl" else set()
    )
    assert set(inputs) == expected
    assert list(inputs["sample"].dims) == [4, -1, -1]
    # one timestep per batch row: sent as [batch, 1], seen by the model as [batch]
    assert list(inputs["timestep"].dims) == [1] and inputs["timestep"].HasField("reshape")
    assert list(inputs["timestep"].reshape.shape) == []
    (output,) = unet.output
    assert output.name == "noise_pred" and output.data_type == mc.TYPE_FP32
    (ids,) = read_config(repo / "text_encoder").input
    assert ids.name == "input_ids" and ids.data_type == mc.TYPE_INT32 and list(ids.dims) == [77]


def test_unchanged_inputs_reuse_the_cache_and_a_changed_component_is_rebuilt(
    tmp_path: Path, tiny_model: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd"), model)
    repo = export_repository(str(model), tmp_path / "repo")
    onnx_files = {p: p.stat().st_mtime_ns for p in repo.glob("*/1/model.onnx")}
    with caplog.at_level(logging.INFO, logger="export.toolchain.repository"):
        export_repository(str(model), repo)
    assert {p: p.stat().st_mtime_ns for p in repo.glob("*/1/model.onnx")} == onnx_files
    assert caplog.text.count("unchanged, reusing") == 4  # text encoder, UNet, VAE, safety checker

    config = json.loads((model / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.2
    (model / "vae" / "config.json").write_text(json.dumps(config))
    export_repository(str(model), repo)
    changed = {p.parent.parent.name for p, t in onnx_files.items() if p.stat().st_mtime_ns != t}
    assert changed == {"vae_decoder"}


def test_check_fails_loudly_when_the_graph_does_not_match(
    repository: Callable[[str], Path], tiny_model: Callable[[str], Path]
) -> None:
    source = ModelSource(tiny_model("sd"))
    vae = next(c for c in components(source) if c.spec.name == "vae_decoder")
    module = vae.load().eval()
    onnx_path = repository("sd") / "vae_decoder" / "1" / "model.onnx"
    results = check_onnx(module, vae.spec, onnx_path)
    assert len(results) == 2 and all(r.ok for r in results)
    with torch.no_grad():
        module.vae.decoder.conv_out.bias.add_(0.05)
    with pytest.raises(OnnxMismatchError, match=r"vae_decoder: ONNX graph does not match torch:\n.*MISMATCH"):
        check_onnx(module, vae.spec, onnx_path)


def test_cli_rejects_what_is_not_a_diffusers_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), "--out", str(tmp_path / "repo")]) == 1
    assert "model_index.json is missing" in capsys.readouterr().err
    assert export_main(["../not/a/model", "--out", str(tmp_path / "repo")]) == 1
    assert "neither a local diffusers folder nor a Hub id" in capsys.readouterr().err


def test_unsupported_pipeline_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    with pytest.raises(ModelSourceError, match="not supported"):
        ModelSource(tmp_path)
