"""The GPU path up to the TensorRT call, on CPU: fp16 graphs, profiles, tensorrt configs, fingerprints,
the refit map of a variant, the CLI without TensorRT, and what the service reads from an engine
repository (buckets, build host, the command to export).

fp16 tolerance (export/models/precision.py): ``|fp16 graph - torch fp32| <= 1e-3 + 1e-2 * max|torch fp32|``.
One fp16 rounding is 2**-11 relative; a UNet step rounds each activation tens of times, so a correct
graph is ~1e-3..5e-3 of the output's scale off (the tiny UNets: 0.8e-3..5e-3 against 1.0e-2..1.4e-2
allowed), while a wrong weight or op is off by O(1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from safetensors.torch import save_file
from tritonclient.grpc import model_config_pb2 as mc

from export.contract import engines, specs
from export.contract.engines import EngineHost, Resolution
from export.fixtures.tiny_lora import build_tiny_lora
from export.models.lora import ONNX_PREFIXES, initializer_map, load_lora, merge_deltas, onnx_state
from export.models.modules import components
from export.models.precision import (
    FP16_TOLERANCE,
    TOLERANCES,
    component_precision,
    default_precision,
    with_precision,
)
from export.models.refit import variant_model_name, variant_refit_map
from export.models.source import ModelSource
from export.toolchain import tensorrt_plan
from export.toolchain.onnx_export import export_onnx
from export.toolchain.options import RepositoryOptions
from export.toolchain.tensorrt_plan import EngineOptions
from export.toolchain.triton_config import config_text, model_config
from server.engines import (
    EngineHostMismatch,
    NotExported,
    RepositoryEngines,
    check_engine_host,
    read_repository,
    require_exported,
)

# ONNX TensorProto data types.
FLOAT, FLOAT16 = 1, 10


# --------------------------------------------------------------------------------------------------
# fp16 graphs against torch (CPU)
# --------------------------------------------------------------------------------------------------


# The models whose architecture a family adds: SDXL's first text encoder and its VAE are the classes
# SD has (CLIPTextModel, AutoencoderKL; the VAE's fp16/fp32 rule is tested on its own below), so the
# SDXL run exports only what differs, to keep `make test` short.
FP16_MODELS = {
    "sd": (specs.TEXT_ENCODER, specs.UNET, specs.VAE_DECODER),
    "sdxl": (specs.TEXT_ENCODER_2, specs.UNET),
}


@pytest.fixture(scope="session")
def fp16_graphs(work_dir: Path, tiny_model: Callable[[str], Path]) -> Callable[[str], dict[str, Path]]:
    """``{model name: fp16 ONNX file}`` of a tiny family, each checked against torch fp32 on export."""
    from export.toolchain.onnx_export import check_onnx

    built: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in built:
            source = ModelSource(tiny_model(family))
            graphs = {}
            for component in components(source):
                if component.spec.name not in FP16_MODELS[family]:
                    continue
                precision, _ = component_precision(source, component.spec.name, "fp16")
                path = work_dir / "fp16" / family / f"{component.spec.name}.onnx"
                export_onnx(
                    with_precision(component.load().eval(), precision),
                    component.spec,
                    component.trace_sizes,
                    path,
                )
                results = check_onnx(component.load().eval(), component.spec, path, TOLERANCES[precision])
                assert results and all(r.ok for r in results)
                graphs[component.spec.name] = path
            built[family] = graphs
        return built[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_fp16_graphs_match_torch_with_the_same_names(
    family: str,
    fp16_graphs: Callable[[str], dict[str, Path]],
    repository: Callable[[str], Path],
    tiny_model: Callable[[str], Path],
) -> None:
    """Each fp16 graph matched torch fp32 within the fp16 tolerance (checked in the fixture, which
    raises past it); the graphs keep float32 I/O, the spec's names, the fp32 export's initializer
    names (LoRA merges and refits look them up), fp16 weights, and attention as plain MatMul/Softmax."""
    fp32_repository = repository(family)
    spec_of = {c.spec.name: c.spec for c in components(ModelSource(tiny_model(family)))}
    assert set(fp16_graphs(family)) == set(FP16_MODELS[family])
    for name, path in fp16_graphs(family).items():
        model = onnx.load(str(path), load_external_data=False)
        spec = spec_of[name]
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
        assert all(o.type.tensor_type.elem_type == FLOAT for o in model.graph.output), (
            "outputs stay float32 whatever the precision"
        )
        assert {i.data_type for i in model.graph.initializer} == {FLOAT16}
        fp32_graph = fp32_repository / name / "1" / "model.onnx"
        prefix = ONNX_PREFIXES.get(name, "")
        assert initializer_map(path, prefix) == initializer_map(fp32_graph, prefix)
        ops = {(n.domain, n.op_type) for n in model.graph.node}
        assert {d for d, _ in ops} == {""}, "standard ONNX ops only (no contrib fused attention)"
        if name != specs.VAE_DECODER:
            assert {("", "MatMul"), ("", "Softmax")} <= ops


def test_fp16_check_fails_loudly_on_a_wrong_graph(
    tmp_path: Path, fp16_graphs: Callable[[str], dict[str, Path]], tiny_model: Callable[[str], Path]
) -> None:
    """A graph with one weight changed is caught by the fp16 check, which names the output."""
    from onnx import numpy_helper

    from export.toolchain.onnx_export import OnnxMismatchError, check_onnx

    source = ModelSource(tiny_model("sd"))
    component = next(c for c in components(source) if c.spec.name == specs.VAE_DECODER)
    model = onnx.load(str(fp16_graphs("sd")[specs.VAE_DECODER]))
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float16(1.5), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(OnnxMismatchError, match="images at"):
        check_onnx(component.load().eval(), component.spec, broken, FP16_TOLERANCE)


def test_precision_per_component(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    """SDXL's VAE decoder stays fp32 unless marked fp16-safe (force_upcast false), as diffusers
    decides; SD's follows the request; the safety checker stays fp32; defaults per target."""
    assert default_precision("tensorrt") == "fp16"
    assert default_precision("python-onnx") == "fp32"
    sd = ModelSource(tiny_model("sd"))
    assert component_precision(sd, specs.VAE_DECODER, "fp16")[0] == "fp16"
    assert component_precision(sd, specs.UNET, "fp16")[0] == "fp16"
    assert component_precision(sd, specs.SAFETY_CHECKER, "fp16")[0] == "fp32"
    assert component_precision(sd, specs.UNET, "fp32")[0] == "fp32"
    for force_upcast, expected in ((True, "fp32"), (False, "fp16"), (None, "fp32")):
        folder = tmp_path / f"sdxl-{force_upcast}"
        (folder / "vae").mkdir(parents=True)
        index = json.loads((tiny_model("sdxl") / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index))
        vae = json.loads((tiny_model("sdxl") / "vae" / "config.json").read_text())
        vae.pop("force_upcast", None)
        if force_upcast is not None:
            vae["force_upcast"] = force_upcast
        (folder / "vae" / "config.json").write_text(json.dumps(vae))
        precision, reason = component_precision(ModelSource(folder), specs.VAE_DECODER, "fp16")
        assert precision == expected, reason
        assert "force_upcast" in reason
        assert component_precision(ModelSource(folder), specs.UNET, "fp16")[0] == "fp16"


# --------------------------------------------------------------------------------------------------
# Buckets, profiles, configs
# --------------------------------------------------------------------------------------------------


def test_resolutions_parse_default_and_check() -> None:
    assert engines.parse_resolutions("1024x576, 512X512,1024x576") == (
        Resolution(1024, 576),
        Resolution(512, 512),
    )
    assert str(Resolution(1024, 576)) == "1024x576"
    assert engines.default_resolutions(1024) == (Resolution(1024, 1024), Resolution(1024, 576))
    assert engines.default_resolutions(512) == (Resolution(512, 512), Resolution(1024, 576))
    for bad in ("", "1024", "1024x", "x576", "1024*576", "-8x8"):
        with pytest.raises(ValueError):
            engines.parse_resolutions(bad)
    engines.check_resolutions([Resolution(64, 64), Resolution(1024, 576)], vae_scale=8)
    for bad_size in (Resolution(1020, 576), Resolution(56, 64)):
        with pytest.raises(engines.ResolutionError, match=str(bad_size)):
            engines.check_resolutions([bad_size], vae_scale=8)


def _unet(sdxl: bool) -> specs.ModelSpec:
    return specs.unet_spec(
        in_channels=4,
        out_channels=4,
        cross_attention_dim=64,
        latent_range=specs.AxisRange(8, 32, 128),
        text_embeds_dim=32 if sdxl else None,
    )


def test_profiles_per_bucket_and_batch() -> None:
    buckets = (Resolution(1024, 576), Resolution(512, 512))
    unet = tensorrt_plan.engine_spec(_unet(sdxl=True), max_batch=8)
    assert unet.axes["batch"] == specs.AxisRange(1, 2, 8) and unet.max_batch_size == 8
    profiles = tensorrt_plan.engine_profiles(unet, buckets, vae_scale=8)
    assert [p.resolution for p in profiles] == list(buckets)
    wide, square = profiles
    assert wide.shapes["sample"] == ((1, 4, 72, 128), (2, 4, 72, 128), (8, 4, 72, 128))
    assert square.shapes["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))
    assert wide.shapes["timestep"] == ((1,), (2,), (8,))
    assert wide.shapes["encoder_hidden_states"] == ((1, 77, 64), (2, 77, 64), (8, 77, 64))
    assert wide.shapes["text_embeds"] == ((1, 32), (2, 32), (8, 32))
    assert wide.shapes["time_ids"] == ((1, 6), (2, 6), (8, 6))
    assert wide.opt_sizes["batch"] == 2 and wide.opt_sizes["height"] == 72 and wide.opt_sizes["width"] == 128

    vae = tensorrt_plan.engine_spec(
        specs.vae_decoder_spec(latent_channels=4, scale_factor=8, latent_range=specs.AxisRange(8, 32, 128)),
        max_batch=4,
    )
    (p,) = tensorrt_plan.engine_profiles(vae, [Resolution(1024, 576)], vae_scale=8)
    assert p.shapes == {"latent": ((1, 4, 72, 128), (1, 4, 72, 128), (4, 4, 72, 128))}
    assert p.opt_sizes["image_height"] == 576 and p.opt_sizes["image_width"] == 1024

    encoder = tensorrt_plan.engine_spec(specs.text_encoder_spec("text_encoder", 64, 64), max_batch=1)
    (p,) = tensorrt_plan.engine_profiles(encoder, buckets, vae_scale=8)
    assert p.resolution is None
    assert p.shapes == {"input_ids": ((1, 77), (1, 77), (1, 77))}  # opt clipped into 1..max_batch
    with pytest.raises(ValueError, match="at least one resolution"):
        tensorrt_plan.engine_profiles(unet, (), vae_scale=8)


@pytest.mark.parametrize(("gpus", "expected_gpus"), [((), []), ((0, 1), [0, 1])])
def test_tensorrt_configs_parse_back_through_the_protobuf(
    gpus: tuple[int, ...], expected_gpus: list[int]
) -> None:
    options = RepositoryOptions(target="tensorrt", engine=EngineOptions(max_batch=8, gpus=gpus))
    unet = tensorrt_plan.engine_spec(_unet(sdxl=False), max_batch=8)
    text = config_text(model_config(unet, options, profiles=2))
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.platform == "tensorrt_plan" and not config.backend
    assert config.default_model_filename == "model.plan"
    assert config.max_batch_size == 8
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 1
    assert list(group.gpus) == expected_gpus
    assert list(group.profile) == ["0", "1"]
    assert config.HasField("dynamic_batching")
    inputs = {i.name: i for i in config.input}
    assert list(inputs["sample"].dims) == [4, -1, -1] and inputs["sample"].data_type == mc.TYPE_FP32
    assert list(inputs["timestep"].dims) == [1] and list(inputs["timestep"].reshape.shape) == []
    assert not config.parameters  # no python-backend parameters


def test_engine_options_are_checked() -> None:
    for bad in ({"max_batch": 0}, {"gpus": (-1,)}, {"workspace_gib": 0.0}):
        with pytest.raises(ValueError):
            EngineOptions(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Fingerprints and the build host
# --------------------------------------------------------------------------------------------------


H100 = EngineHost("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")


def test_fingerprint_changes_with_gpu_and_tensorrt_version() -> None:
    base = engines.engine_fingerprint("graph", H100)
    assert base == engines.engine_fingerprint("graph", EngineHost(**H100.as_dict()))
    others = {
        engines.engine_fingerprint("graph", replace(H100, gpu="NVIDIA L4")),
        engines.engine_fingerprint("graph", replace(H100, tensorrt="10.9.0.34")),
        engines.engine_fingerprint("graph", replace(H100, compute_capability="8.9")),
        engines.engine_fingerprint("other graph", H100),
    }
    assert base not in others and len(others) == 4
    assert EngineHost.from_dict(H100.as_dict()) == H100


def test_engine_host_check(tmp_path: Path) -> None:
    engines = RepositoryEngines("tensorrt", (Resolution(512, 512),), H100)
    check_engine_host(engines, {0: H100}, tmp_path, "m")
    check_engine_host(engines, {0: replace(H100, tensorrt="")}, tmp_path, "m")  # unknown version: GPU only
    check_engine_host(RepositoryEngines(), {}, tmp_path, "m")  # python targets: nothing to check
    L4 = replace(H100, gpu="NVIDIA L4", device=1)
    for running, reason in (
        ({0: replace(H100, gpu="NVIDIA L4")}, "GPU 0: GPU NVIDIA H100 80GB HBM3 != this host's NVIDIA L4"),
        ({0: replace(H100, tensorrt="10.9.0.34")}, "TensorRT 10.8.0.43 != this host's 10.9.0.34"),
        ({}, "NVML finds none"),
        # a host of mixed GPUs: Triton places the models on every GPU unless --gpus named some
        ({0: H100, 1: L4}, "GPU 1: GPU NVIDIA H100 80GB HBM3 != this host's NVIDIA L4"),
    ):
        with pytest.raises(EngineHostMismatch) as info:
            check_engine_host(engines, running, tmp_path, "some/model")
        assert reason in str(info.value)
        assert f"t2i-export some/model --target tensorrt --out {tmp_path}" in str(info.value)
    # --gpus 1 at export: the engines run on GPU 1 only, whatever GPU 0 is
    on_l4 = RepositoryEngines("tensorrt", (), replace(L4, device=1), gpus=(1,))
    check_engine_host(on_l4, {0: H100, 1: L4}, tmp_path, "m")
    with pytest.raises(EngineHostMismatch, match="GPU 1: GPU NVIDIA L4 != this host's NVIDIA H100"):
        check_engine_host(on_l4, {0: L4, 1: H100}, tmp_path, "m")
    with pytest.raises(EngineHostMismatch, match=r"GPU 1 \(named by --gpus at export\) is not on this host"):
        check_engine_host(on_l4, {0: L4}, tmp_path, "m")


def test_service_reads_buckets_and_host_from_the_manifest(tmp_path: Path) -> None:
    assert read_repository(tmp_path) == RepositoryEngines()
    (tmp_path / "t2i-repository.json").write_text(
        json.dumps(
            {
                "target": "tensorrt",
                "models": [],
                "resolutions": ["1024x576", "512x512"],
                "engine": H100.as_dict(),
                "gpus": [1],
            }
        )
    )
    engines = read_repository(tmp_path)
    assert engines.gpus == (1,)
    assert engines.resolutions == (Resolution(1024, 576), Resolution(512, 512))
    assert engines.built_on == H100
    assert engines.serves(1024, 576) and engines.serves(512, 512)
    assert not engines.serves(576, 1024) and not engines.serves(768, 768)
    assert engines.served_sizes() == "1024x576, 512x512"
    assert RepositoryEngines().serves(123, 456)


def test_missing_export_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(NotExported) as info:
        require_exported(tmp_path / "repository", "stabilityai/sdxl-turbo", gpu=True)
    message = str(info.value)
    assert f"t2i-export stabilityai/sdxl-turbo --target tensorrt --out {tmp_path / 'repository'}" in message
    assert "docker run --rm --gpus all" in message
    with pytest.raises(NotExported, match="--target python-onnx"):
        require_exported(tmp_path, "m", gpu=False)
    (tmp_path / "t2i-repository.json").write_text("{}")
    require_exported(tmp_path, "m", gpu=False)


# --------------------------------------------------------------------------------------------------
# The refit weight map of a variant, and the CLI without TensorRT
# --------------------------------------------------------------------------------------------------


def test_refit_map_of_a_variant(
    tmp_path: Path, fp16_graphs: Callable[[str], dict[str, Path]], tiny_model: Callable[[str], Path]
) -> None:
    """From the base (fp16) graph and the variant's overrides file, the weights a refit sets: every
    merged parameter under its ONNX initializer name, in the base dtype and shape, equal to the
    merged tensor; nothing else."""
    graph = fp16_graphs("sd")[specs.UNET]
    base = onnx_state(graph, "unet.")
    lora = build_tiny_lora("sd", tmp_path / "lora.safetensors", "kohya", 1, model_dir=tiny_model("sd"))
    deltas = merge_deltas(base, [(load_lora(lora), 0.8)], "unet")
    assert deltas
    key = "0123456789abcdef"
    overrides = tmp_path / "unet" / "variants" / f"{key}.safetensors"
    overrides.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(overrides))
    weights = variant_refit_map(graph, overrides, "unet")
    assert set(weights) == {f"unet.{p}" for p in deltas}
    assert set(weights) <= set(initializer_map(graph, "unet.").values())
    for param, merged in deltas.items():
        array = weights[f"unet.{param}"]
        assert array.dtype == np.float16 and array.shape == tuple(base[param].shape)
        assert array.flags.c_contiguous
        np.testing.assert_array_equal(array, merged.to(torch.float16).numpy())
        assert not np.array_equal(array, base[param].numpy())
    assert variant_model_name("unet", key) == f"unet__{key}"
    for bad in ("ABCDEF0123456789", "0123", "../x"):
        with pytest.raises(ValueError):
            variant_model_name("unet", bad)


def test_tensorrt_target_without_tensorrt_exits_2_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.toolchain.cli",
            str(tmp_path / "model"),
            "--target",
            "tensorrt",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "TensorRT" in lines[0] and "tensorrt" in lines[0] and "Docker image" in lines[0]
    assert not (tmp_path / "r").exists()


def test_cli_refuses_bad_engine_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.toolchain.cli import main

    for args, message in (
        (["--resolutions", "1024"], "not a resolution WIDTHxHEIGHT"),
        (["--gpus", "a,b"], "not a list of GPU indices"),
        (["--max-batch", "0"], "must be positive"),
        (["--precision", "int8"], "invalid choice"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["m", "--target", "tensorrt", "--out", str(tmp_path), *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
