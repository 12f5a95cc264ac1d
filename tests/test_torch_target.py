"""The python-torch target: the exported repository, the module runner, LoRA variant overrides, and
the Triton models themselves (real bundled Triton) against diffusers' own modules."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from safetensors.torch import save_file
from tritonclient.grpc import model_config_pb2 as mc

from export.contract.specs import MANIFEST_FILE, VARIANTS_DIR
from export.fixtures.tiny_lora import build_tiny_lora
from export.models.lora import load_base_state, load_lora, merge_deltas
from export.models.modules import components
from export.models.source import ModelSource
from export.toolchain.onnx_export import example_inputs
from export.toolchain.repository import export_repository
from export.triton_models.torch_model import CudaGraphs, TorchModel, TorchOptions, batch_bucket
from export.triton_models.torch_source import MODULE_FILE, base_state, cuda_dtype_for, load_component
from export.triton_models.torch_variants import VariantError, VariantWeights
from server.triton.launcher import BundledTriton
from tests.support.service import needs_triton

TORCH = "python-torch"


def _feeds(spec: Any, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in example_inputs(spec, sizes, seed=seed).items()}


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def test_options_round_trip_through_config_parameters() -> None:
    options = TorchOptions(channels_last=True, compile_mode="max-autotune-no-cudagraphs", cuda_graphs=True)
    assert TorchOptions.from_parameters(options.parameters()) == options
    assert TorchOptions.from_parameters({}) == TorchOptions()


def test_gpu_switches_are_off_on_cpu() -> None:
    options = TorchOptions(channels_last=True, compile_mode="default", cuda_graphs=True, max_lora_variants=2)
    on_cpu = options.for_device(torch.device("cpu"))
    assert (on_cpu.channels_last, on_cpu.compile_mode, on_cpu.cuda_graphs) == (False, "", False)
    assert on_cpu.max_lora_variants == 2
    assert options.for_device(torch.device("cuda", 0)) == options


@pytest.mark.parametrize(
    "params",
    [
        {"compile_mode": "fast"},
        {"cuda_graphs": "true", "compile_mode": "reduce-overhead"},
        {"max_lora_variants": "0"},
        {"channels_last": "maybe"},
    ],
)
def test_bad_options_are_refused(params: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        TorchOptions.from_parameters(params)


def test_batch_buckets() -> None:
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert batch_bucket(5, 6) == 6


# --------------------------------------------------------------------------------------------------
# The exported repository
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_repository_layout(family: str, repository: Callable[..., Path]) -> None:
    repo = repository(family, TORCH)
    manifest = json.loads((repo / MANIFEST_FILE).read_text())
    assert manifest["target"] == TORCH
    assert not list(repo.rglob("*.onnx"))
    onnx_repo = repository(family)
    for name in manifest["models"]:
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        onnx_config = text_format.Parse((onnx_repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        # The same names, shapes and batching as the other target: one spec, one writer.
        assert config.input == onnx_config.input and config.output == onnx_config.output
        assert config.max_batch_size == onnx_config.max_batch_size
        assert config.backend == "python"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
        assert (
            TorchOptions.from_parameters({k: v.string_value for k, v in config.parameters.items()})
            == TorchOptions()
        )
        version = repo / name / "1"
        assert (
            (version / "model.py")
            .read_text()
            .startswith('"""Triton python-backend model that runs a diffusers')
        )
        assert json.loads((version / MODULE_FILE).read_text())["name"] == name
        assert list((version / "source").rglob("*.safetensors")), f"{name} has no weights"
    dtypes = {
        n: json.loads((repo / n / "1" / MODULE_FILE).read_text())["cuda_dtype"] for n in manifest["models"]
    }
    # diffusers' SDXL pipeline upcasts its VAE (force_upcast); everything else runs in fp16 on CUDA.
    upcast = family == "sdxl" and ModelSource(Path(manifest["model"])).config("vae").get("force_upcast", True)
    assert dtypes.pop("vae_decoder") == ("float32" if upcast else "float16")
    assert set(dtypes.values()) == {"float16"}


@pytest.mark.parametrize(
    ("family", "force_upcast", "vae_dtype"),
    [("sdxl", True, "float32"), ("sdxl", False, "float16"), ("sd", True, "float16")],
)
def test_cuda_dtype_follows_diffusers_vae_upcast(
    family: str, force_upcast: bool, vae_dtype: str, tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    """diffusers' SDXL pipeline runs a ``force_upcast`` VAE in fp32; SD's pipeline never upcasts."""
    model = tiny_model(family)
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text((model / "model_index.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**vae, "force_upcast": force_upcast}))
    source = ModelSource(tmp_path)
    specs = {c.spec.name: c.spec for c in components(ModelSource(model))}
    assert cuda_dtype_for(source, specs["vae_decoder"]) == vae_dtype
    assert cuda_dtype_for(source, specs["unet"]) == "float16"


def test_export_is_reused_and_cli_takes_the_target(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    from export.toolchain.cli import main as export_main
    from export.toolchain.options import RepositoryOptions

    out = tmp_path / "repo"
    options = RepositoryOptions(target=TORCH, check=False)
    export_repository(str(tiny_model("sd")), out, options)
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/config.pbtxt")}
    assert export_main([str(tiny_model("sd")), "--target", TORCH, "--no-check", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/config.pbtxt")} == stamp
    with pytest.raises(SystemExit):
        export_main(
            [
                str(tiny_model("sd")),
                "--target",
                TORCH,
                "--cuda-graphs",
                "--torch-compile",
                "reduce-overhead",
                "--out",
                str(out),
            ]
        )
    assert (
        export_main(
            [str(tiny_model("sd")), "--target", TORCH, "--no-check", "--channels-last", "--out", str(out)]
        )
        == 0
    )
    config = text_format.Parse((out / "unet" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.parameters["channels_last"].string_value == "true"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_runner_matches_the_component_module(
    family: str, repository: Callable[..., Path], tiny_model: Callable[[str], Path]
) -> None:
    """The module rebuilt from the model directory computes what the exporter's module computes, and a
    dynamic batch of several requests gives each request what it gets alone."""
    repo = repository(family, TORCH)
    reference = {c.spec.name: c for c in components(ModelSource(tiny_model(family)))}
    for name, component in reference.items():
        model = TorchModel.load(repo / name, "1", torch.device("cpu"), TorchOptions())
        module = component.load().eval()
        small, large = component.spec.check_sizes
        a, b, c = (
            _feeds(component.spec, large, 1),
            _feeds(component.spec, small, 2),
            _feeds(component.spec, large, 3),
        )
        batched = model.run([a, c])
        for feeds, got in ((a, batched[0]), (c, batched[1]), (b, model.run([b])[0])):
            with torch.no_grad():
                expected = module(*(feeds[t.name] for t in component.spec.inputs))
            expected = (expected,) if isinstance(expected, torch.Tensor) else expected
            for t, ref in zip(component.spec.outputs, expected, strict=True):
                assert got[t.name].dtype == torch.float32
                torch.testing.assert_close(got[t.name], ref, atol=1e-5, rtol=1e-4, msg=f"{name}.{t.name}")


def test_channels_last_and_compile_wiring(
    repository: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU switches, forced on for CPU here: channels_last gives the same noise prediction, and
    torch.compile is called with the configured mode on the module that runs."""
    version = repository("sd", TORCH) / "unet" / "1"
    feeds = [_feeds(load_component(version).component.spec, {"batch": 2, "height": 9, "width": 11}, 5)]
    base = TorchModel(load_component(version), torch.device("cpu"), TorchOptions(), version)
    expected = base.run(feeds)[0]["noise_pred"]
    monkeypatch.setattr(TorchOptions, "for_device", lambda self, device: self)
    fast = TorchModel(load_component(version), torch.device("cpu"), TorchOptions(channels_last=True), version)
    conv = fast.module.get_submodule("unet.conv_in")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.run(feeds)[0]["noise_pred"], expected, atol=1e-5, rtol=1e-4)

    compiled: list[tuple[object, str]] = []

    def fake_compile(module: torch.nn.Module, mode: str) -> torch.nn.Module:
        compiled.append((module, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = TorchModel(
        load_component(version),
        torch.device("cpu"),
        TorchOptions(compile_mode="max-autotune-no-cudagraphs"),
        version,
    )
    assert compiled == [(model.module, "max-autotune-no-cudagraphs")]
    torch.testing.assert_close(model.run(feeds)[0]["noise_pred"], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here)")
def test_cuda_graphs_replay_matches_eager() -> None:
    layer = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU()).cuda().half()
    graphs = CudaGraphs(lambda x: (layer(x),), max_batch=8, limit=4)
    for rows in (1, 3, 3, 5):
        x = torch.randn(rows, 4, 16, 24, device="cuda", dtype=torch.float16)
        (got,) = graphs(x)
        torch.testing.assert_close(got, layer(x))
    assert len(graphs._graphs) == 3  # buckets 1, 4, 8


# --------------------------------------------------------------------------------------------------
# LoRA variants: in-place overrides
# --------------------------------------------------------------------------------------------------


def _key(i: int) -> str:
    return f"{i:016x}"


def test_variant_weights_swap_evict_and_refuse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    base = {k: v.clone() for k, v in module.state_dict().items()}
    overrides = {
        i: {"0.weight": torch.randn(4, 3) + i, **({"1.bias": torch.randn(2)} if i % 2 else {})}
        for i in range(1, 4)
    }
    for i, tensors in overrides.items():
        save_file(tensors, str(tmp_path / f"{_key(i)}.safetensors"))
    save_file({"2.weight": torch.zeros(1)}, str(tmp_path / f"{_key(7)}.safetensors"))
    save_file({"0.weight": torch.zeros(3, 4)}, str(tmp_path / f"{_key(8)}.safetensors"))
    variants = VariantWeights(module, tmp_path, max_resident=2)
    weight = module[0].weight
    pointer = weight.data_ptr()

    def check(active: int) -> None:
        expected = {**base, **(overrides[active] if active else {})}
        for name, value in module.state_dict().items():
            torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)

    for i in (1, 2, 1, 0, 3, 2, 0):
        variants.activate(_key(i) if i else "")
        check(i)
    assert weight.data_ptr() == pointer  # overridden in place: compiled graphs keep their pointers
    assert variants.resident == [_key(3), _key(2)]  # at most 2, least recently used first
    for bad, message in (
        ("ABCDEF0123456789", "bad LoRA variant key"),
        ("../../etc/passwd", "bad LoRA variant key"),
        (_key(9), "not found"),
        (_key(7), "no parameter '2.weight'"),
        (_key(8), r"has shape \(3, 4\)"),
    ):
        with pytest.raises(VariantError, match=message):
            variants.activate(bad)
        check(0)
    assert variants.resident == [_key(3), _key(2)]


# --------------------------------------------------------------------------------------------------
# Through the real bundled Triton: the UNet and text encoder with LoRA variants vs diffusers
# --------------------------------------------------------------------------------------------------


@cache
def _lora_pipeline(model_dir: str, lora: str) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_lora_weights(lora, adapter_name="a")
    pipe.fuse_lora(lora_scale=0.7, adapter_names=["a"])
    return pipe


def _infer(
    grpc_url: str, model: str, requests: list[tuple[dict[str, np.ndarray], object]], outputs: list[str]
) -> list[Any]:
    """Send ``requests`` to ``model`` at once (so the dynamic batcher may group them); each answer is a
    dict of outputs or the error's message."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    async def one(client: Any, feeds: dict[str, np.ndarray], variant: object) -> Any:
        inputs = []
        for name, array in feeds.items():
            data = np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array)
            inputs.append(grpcclient.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype)))
            inputs[-1].set_data_from_numpy(data)
        parameters = {"lora_variant": variant} if variant is not None else None
        try:
            result = await client.infer(model, inputs, parameters=parameters, client_timeout=120)
        except InferenceServerException as e:
            return str(e)
        return {n: result.as_numpy(n) for n in outputs}

    async def run() -> list[Any]:
        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            return list(await asyncio.gather(*(one(client, f, v) for f, v in requests)))
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.mark.slow
@needs_triton
def test_triton_models_serve_lora_variants_like_diffusers_fused_weights(
    work_dir: Path,
    tiny_model: Callable[[str], Path],
    repository: Callable[..., Path],
    triton: Callable[..., BundledTriton],
) -> None:
    """A variant file written as the service writes it (``merge_deltas`` over the base weights, keyed by
    the diffusers module's parameter names) makes the Triton UNet and text encoder compute what
    diffusers' ``load_lora_weights`` + ``fuse_lora`` modules compute; base requests batched with it
    still get the base; a bad or missing variant fails only its own request."""
    model_dir = tiny_model("sd")
    lora_path = work_dir / "torch-target-lora"
    if not lora_path.exists():
        build_tiny_lora("sd", lora_path, "diffusers", seed=11, model_dir=model_dir, text_encoder=True)
    lora = load_lora(lora_path)
    repo = repository("sd", TORCH)
    key = "0123456789abcdef"
    for component in ("unet", "text_encoder"):
        state = base_state(repo / component)  # what the service merges into on this target
        torch.testing.assert_close(state, load_base_state(model_dir, component), atol=0, rtol=0)
        deltas = merge_deltas(state, [(lora, 0.7)], component)
        assert deltas
        (repo / component / VARIANTS_DIR).mkdir(exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in deltas.items()},
            str(repo / component / VARIANTS_DIR / f"{key}.safetensors"),
        )
    server = triton("sd", TORCH)
    parts = {c.spec.name: c for c in components(ModelSource(model_dir))}
    fused = _lora_pipeline(str(model_dir), str(lora_path))
    base_modules = {name: c.load().eval() for name, c in parts.items()}

    unet_spec = parts["unet"].spec
    feeds = [example_inputs(unet_spec, {"batch": 2, "height": 8, "width": 12}, seed=s) for s in (1, 2, 3)]
    answers = _infer(
        server.grpc_url,
        "unet",
        [
            (feeds[0], key),
            (feeds[1], None),
            (feeds[2], key),
            (feeds[0], "f" * 15),
            (feeds[1], "ab" * 8),
            (feeds[2], 5),
        ],
        ["noise_pred"],
    )
    with torch.no_grad():
        for i, variant in ((0, True), (1, False), (2, True)):
            sample, timestep, hidden = (
                torch.from_numpy(feeds[i][n]) for n in ("sample", "timestep", "encoder_hidden_states")
            )
            if variant:
                expected = fused.unet(sample, timestep, encoder_hidden_states=hidden).sample
            else:
                expected = base_modules["unet"](sample, timestep, hidden)
            got = answers[i]
            assert isinstance(got, dict), got
            np.testing.assert_allclose(got["noise_pred"], expected.numpy(), atol=1e-4, rtol=1e-3)
    base_pred = answers[1]["noise_pred"]
    with torch.no_grad():
        lora_on_1 = fused.unet(
            *(torch.from_numpy(feeds[1][n]) for n in ("sample", "timestep")),
            encoder_hidden_states=torch.from_numpy(feeds[1]["encoder_hidden_states"]),
        ).sample
    assert np.abs(lora_on_1.numpy() - base_pred).max() > 1e-3, (
        "the LoRA changes nothing: the test proves nothing"
    )
    assert "bad LoRA variant key" in answers[3]
    assert "not found" in answers[4]
    assert "must be a string" in answers[5]

    text_feeds = example_inputs(parts["text_encoder"].spec, {"batch": 2}, seed=4)
    ids = text_feeds["input_ids"]
    (with_lora, without) = _infer(
        server.grpc_url, "text_encoder", [(text_feeds, key), (text_feeds, "")], ["last_hidden_state"]
    )
    with torch.no_grad():
        expected_lora = fused.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
        expected_base = base_modules["text_encoder"](torch.from_numpy(ids))[0]
    np.testing.assert_allclose(with_lora["last_hidden_state"], expected_lora.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(without["last_hidden_state"], expected_base.numpy(), atol=1e-4, rtol=1e-3)

    (vae_answer,) = _infer(
        server.grpc_url,
        "vae_decoder",
        [(example_inputs(parts["vae_decoder"].spec, {"batch": 1, "height": 8, "width": 8}), key)],
        ["images"],
    )
    assert "has no LoRA variants" in vae_answer


@pytest.mark.slow
@needs_triton
def test_service_serves_lora_variants_on_the_torch_target_like_diffusers(
    service: Callable[..., str], lora_dir: Path, tiny_model: Callable[[str], Path]
) -> None:
    """The service builds the variant from the torch model's own safetensors (no ONNX here), sends
    ``lora_variant``, and the image equals diffusers' LoRA pipeline; the base stays the base."""
    from tests.support.images import assert_close, decode, generate
    from tests.support.lora import BODY, reference

    url = service("sd", TORCH, lora_dir=lora_dir, lora_hub=False)
    (image,) = generate(url, **BODY, loras=json.dumps({"sd-diffusers-a": 0.8}), seed=21)
    assert_close(
        decode(image["url"]), reference(tiny_model("sd"), {str(lora_dir / "sd-diffusers-a"): 0.8}, 21)
    )
    (base,) = generate(url, **BODY, seed=21)
    assert np.abs(decode(base["url"]).astype(int) - decode(image["url"]).astype(int)).max() > 2
