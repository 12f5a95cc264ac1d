"""Models as the Hub holds them (issue 22): configs that say float16, fp16-only / ``.bin``-only / both
layouts, sharded weights, downloads of only the chosen files, one-line errors for what is missing.

The layouts are written by diffusers' and transformers' own ``save_pretrained`` (export/fixtures/tiny.py
``save_as_hub``), the Hub listing is that of a real repository, and the download test filters it with
huggingface_hub's own pattern matcher.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from export.contract import specs
from export.contract.specs import MANIFEST_FILE, SOURCE_DIR
from export.fixtures.tiny import HubLayout, save_as_hub
from export.models.modules import components
from export.models.precision import float32_compute
from export.models.source import CONFIG_PATTERNS, ModelSource
from export.models.weights import (
    AUTO,
    NO_VARIANT,
    MissingWeightsError,
    allow_patterns,
    choose_weights,
    folder_files,
    variant_preference,
)
from export.toolchain.onnx_export import example_inputs, export_onnx
from export.toolchain.options import RepositoryOptions
from export.toolchain.repository import export_repository
from export.triton_models.torch_source import MODULE_FILE, load_component

REPO_ROOT = Path(__file__).resolve().parents[1]

# The files of stable-diffusion-v1-5/stable-diffusion-v1-5 (main), as its Hub page lists them, plus the
# kinds of files other repositories add (flax weights, ONNX exports beside the diffusers folders).
SD15_LISTING = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx",
    "unet/weights.pb",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae_decoder/model.onnx",
]
SD15_FOLDERS = {
    "text_encoder": "transformers",
    "unet": "diffusers",
    "vae": "diffusers",
    "safety_checker": "transformers",
}
SD15_CONFIGS = {
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
}


def _chosen(listing: list[str], precision: str, variant: str = AUTO) -> dict[str, tuple[str, ...]]:
    preference = variant_preference(precision, variant)
    return {
        folder: choose_weights(listing, folder, library, preference).files  # type: ignore[arg-type]
        for folder, library in SD15_FOLDERS.items()
    }


def test_sd15_listing_fp32_reads_the_full_safetensors() -> None:
    assert _chosen(SD15_LISTING, "fp32") == {
        "text_encoder": ("text_encoder/model.safetensors",),
        "unet": ("unet/diffusion_pytorch_model.safetensors",),
        "vae": ("vae/diffusion_pytorch_model.safetensors",),
        "safety_checker": ("safety_checker/model.safetensors",),
    }


def test_sd15_listing_fp16_reads_the_fp16_safetensors_and_downloads_nothing_else() -> None:
    chosen = _chosen(SD15_LISTING, "fp16")
    assert chosen == {
        "text_encoder": ("text_encoder/model.fp16.safetensors",),
        "unet": ("unet/diffusion_pytorch_model.fp16.safetensors",),
        "vae": ("vae/diffusion_pytorch_model.fp16.safetensors",),
        "safety_checker": ("safety_checker/model.fp16.safetensors",),
    }
    # What snapshot_download fetches with these patterns, by huggingface_hub's own matcher.
    patterns = [*CONFIG_PATTERNS, *allow_patterns(_choice(SD15_LISTING, "fp16"))]
    fetched = set(filter_repo_objects(SD15_LISTING, allow_patterns=patterns))
    assert fetched == SD15_CONFIGS | {f for files in chosen.values() for f in files}


def _choice(listing: list[str], precision: str) -> list:  # type: ignore[type-arg]
    preference = variant_preference(precision)
    return [choose_weights(listing, f, lib, preference) for f, lib in SD15_FOLDERS.items()]  # type: ignore[arg-type]


def test_fp16_only_and_bin_only_listings() -> None:
    fp16_only = [f for f in SD15_LISTING if ".fp16." in f or not f.endswith((".safetensors", ".bin"))]
    assert _chosen(fp16_only, "fp32")["unet"] == ("unet/diffusion_pytorch_model.fp16.safetensors",)
    bin_only = [f for f in SD15_LISTING if not f.endswith(".safetensors") and ".fp16." not in f]
    assert _chosen(bin_only, "fp32") == {
        "text_encoder": ("text_encoder/pytorch_model.bin",),
        "unet": ("unet/diffusion_pytorch_model.bin",),
        "vae": ("vae/diffusion_pytorch_model.bin",),
        "safety_checker": ("safety_checker/pytorch_model.bin",),
    }
    # Asked for by name: the non-EMA UNet; folders without that variant read their full files.
    named = _chosen(SD15_LISTING, "fp32", "non_ema")
    assert named["unet"] == ("unet/diffusion_pytorch_model.non_ema.safetensors",)
    assert named["vae"] == ("vae/diffusion_pytorch_model.safetensors",)


def test_missing_weights_name_the_folder_and_the_pattern() -> None:
    fp16_only = [f for f in SD15_LISTING if ".fp16." in f or not f.endswith((".safetensors", ".bin"))]
    with pytest.raises(MissingWeightsError) as e:
        choose_weights(fp16_only, "unet", "diffusers", variant_preference("fp32", NO_VARIANT), root="/m")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("/m/unet: ")
    assert "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin" in message
    with pytest.raises(MissingWeightsError, match=r"vae: .*diffusion_pytorch_model\[\.fp16\|\.bf16\]"):
        choose_weights(["vae/config.json"], "vae", "diffusers", variant_preference("fp16"))


def test_sharded_variant_weights_as_diffusers_saves_them(
    tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    """A UNet saved in shards (as an fp32 SDXL UNet of 10.3 GB is at diffusers' 10 GB default), both
    full and fp16: the index and its shards are chosen, and the loader reads exactly them."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd"), subfolder="unet")
    unet.save_pretrained(tmp_path / "unet", max_shard_size="200KB")
    unet.half().save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="200KB")
    files = folder_files(tmp_path)
    for precision, variant in (("fp32", None), ("fp16", "fp16")):
        choice = choose_weights(files, "unet", "diffusers", variant_preference(precision))
        assert choice.variant == variant and len(choice.files) > 2
        assert choice.files[0].endswith(".json")
        shards = [f for f in files if f.startswith("unet/") and f.endswith(".safetensors")]
        assert set(choice.files[1:]) == {f for f in shards if (".fp16" in f) == (variant == "fp16")}
        loaded = UNet2DConditionModel.from_pretrained(
            tmp_path, subfolder="unet", dtype=torch.float32, **choice.from_pretrained_kwargs()
        )
        expected = unet.conv_in.weight.float()
        torch.testing.assert_close(loaded.conv_in.weight, expected, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------------
# Tiny repositories saved as the Hub saves them, exported
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_layout(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]
) -> Callable[[HubLayout], Path]:
    """``hub_layout(layout)``: the tiny SD model saved as a Hub repository of that layout."""
    folders: dict[str, Path] = {}

    def get(layout: HubLayout) -> Path:
        if layout not in folders:
            out = tmp_path_factory.mktemp("hub") / layout.replace("+", "-")
            folders[layout] = save_as_hub(tiny_model("sd"), out, layout)
        return folders[layout]

    return get


def _initializer_types(model_dir: Path) -> set[int]:
    model = onnx.load(str(model_dir / "1" / "model.onnx"), load_external_data=False)
    return {init.data_type for init in model.graph.initializer if init.data_type in _FLOATS}


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _output_types(model_dir: Path) -> set[int]:
    model = onnx.load(str(model_dir / "1" / "model.onnx"), load_external_data=False)
    return {o.type.tensor_type.elem_type for o in model.graph.output}


def _assert_dtypes(repo: Path, precision: str) -> None:
    expected = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert _initializer_types(repo / name) == {expected}, name
        assert _output_types(repo / name) == {onnx.TensorProto.FLOAT}, name
    # The safety checker stays fp32 in every precision.
    assert _initializer_types(repo / specs.SAFETY_CHECKER) == {onnx.TensorProto.FLOAT}


@pytest.mark.parametrize(
    "precision",
    ["fp32", pytest.param("fp16", marks=pytest.mark.slow)],  # ~25 s each: one tiny SD export
)
def test_configs_saying_float16_do_not_decide_the_graphs_dtype(
    tmp_path: Path, hub_layout: Callable[[HubLayout], Path], precision: str
) -> None:
    """fp32 and fp16 files side by side, the transformers configs saying float16 (the last save ran on
    fp16 modules): every graph has the initializers of the export's precision, float32 outputs."""
    model = hub_layout("fp32+fp16")
    config = json.loads((model / "text_encoder" / "config.json").read_text())
    assert config["dtype"] == "float16"  # what transformers wrote, the case that broke fp32 exports
    repo = export_repository(str(model), tmp_path / "repo", RepositoryOptions(precision=precision))  # type: ignore[arg-type]
    _assert_dtypes(repo, precision)
    weights = json.loads((repo / MANIFEST_FILE).read_text())["weights"]
    infix = ".fp16" if precision == "fp16" else ""
    assert weights["unet"] == [f"unet/diffusion_pytorch_model{infix}.safetensors"]
    assert weights["safety_checker"] == ["safety_checker/model.safetensors"]


@pytest.mark.slow  # ~25 s each: one tiny SD export
@pytest.mark.parametrize("layout", ["fp16", "bin"])
def test_fp16_only_and_bin_only_repositories_export(
    tmp_path: Path, hub_layout: Callable[[HubLayout], Path], layout: HubLayout
) -> None:
    repo = export_repository(str(hub_layout(layout)), tmp_path / "repo", RepositoryOptions())
    _assert_dtypes(repo, "fp32")
    weights = json.loads((repo / MANIFEST_FILE).read_text())["weights"]
    ending = ".fp16.safetensors" if layout == "fp16" else ".bin"
    assert all(files[0].endswith(ending) for files in weights.values()), weights


def test_python_torch_copies_the_chosen_files_and_loads_in_the_gpu_dtype(
    tmp_path: Path, hub_layout: Callable[[HubLayout], Path]
) -> None:
    repo = export_repository(
        str(hub_layout("fp32+fp16")), tmp_path / "repo", RepositoryOptions(target="python-torch")
    )
    version = repo / "unet" / "1"
    weights = sorted(p.name for p in (version / SOURCE_DIR / "unet").iterdir() if p.suffix != ".json")
    assert weights == ["diffusion_pytorch_model.fp16.safetensors"]
    assert json.loads((version / MODULE_FILE).read_text())["cuda_dtype"] == "float16"
    cpu = load_component(version)
    assert {p.dtype for p in cpu.module.parameters()} == {torch.float32}
    gpu_dtype = load_component(version, cuda=True)  # loaded in fp16 (on CPU here), not cast after
    assert {p.dtype for p in gpu_dtype.module.parameters()} == {torch.float16}


def test_hub_id_downloads_only_the_chosen_files(
    tmp_path: Path, hub_layout: Callable[[HubLayout], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub id: the configs first, then exactly the chosen weight files (from the repository's
    listing); checkpoints, ONNX files and the other variant are never fetched."""
    import huggingface_hub

    remote = tmp_path / "remote"
    shutil.copytree(hub_layout("fp32+fp16"), remote)
    for junk in ("v1-5-pruned.ckpt", "unet/model.onnx", "unet/diffusion_pytorch_model.non_ema.safetensors"):
        (remote / junk).write_bytes(b"not to be downloaded")
    listing = folder_files(remote)
    snapshot = tmp_path / "snapshot"
    requests: list[list[str] | None] = []

    def snapshot_download(repo_id: str, *, allow_patterns: list[str] | None = None, **_: object) -> str:
        assert repo_id == "someone/tiny-sd"
        requests.append(allow_patterns)
        for f in filter_repo_objects(listing, allow_patterns=allow_patterns):
            (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(remote / f, snapshot / f)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **_: listing)
    export_repository("someone/tiny-sd", tmp_path / "repo", RepositoryOptions(target="python-torch"))
    assert len(requests) == 2 and requests[0] == list(CONFIG_PATTERNS)
    weights = {f for f in folder_files(snapshot) if f.endswith((".safetensors", ".bin", ".ckpt", ".onnx"))}
    assert weights == {
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/model.safetensors",  # the checker stays fp32
    }


def test_cli_missing_weights_is_one_line_on_stderr(
    tmp_path: Path, hub_layout: Callable[[HubLayout], Path]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(hub_layout("fp32+fp16"), model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "export.toolchain.cli", str(model), "--out", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(model / "unet") in lines[0] and "diffusion_pytorch_model" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "repo" / "text_encoder").exists()  # checked before any work


# --------------------------------------------------------------------------------------------------
# The memory-bounded export computes what the plain one does
# --------------------------------------------------------------------------------------------------


def test_streamed_weights_are_the_exporters_own(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    """The graph traced without its weights and the weights written from the tensors: the same
    initializers (names, types, values) and the same graph inputs as torch's own export with its
    parameters, for the UNet in fp16 (the with_precision hooks included)."""
    from export.models.precision import with_precision

    source = ModelSource(tiny_model("sd"))
    unet = next(c for c in components(source) if c.spec.name == specs.UNET)
    module = with_precision(unet.load(torch.float16).eval(), "fp16")
    ours = tmp_path / "ours" / "model.onnx"
    export_onnx(module, unet.spec, unet.trace_sizes, ours)
    theirs = tmp_path / "theirs.onnx"
    feeds = example_inputs(unet.spec, unet.trace_sizes)
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(feeds[t.name]) for t in unet.spec.inputs),
            str(theirs),
            input_names=[t.name for t in unet.spec.inputs],
            output_names=[t.name for t in unet.spec.outputs],
            dynamic_axes={t.name: t.dynamic_axes() for t in (*unet.spec.inputs, *unet.spec.outputs)},
            opset_version=17,
            do_constant_folding=False,
            keep_initializers_as_inputs=True,
            dynamo=False,
        )
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    assert [i.name for i in a.graph.input] == [t.name for t in unet.spec.inputs]
    a_inits = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    b_inits = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert a_inits.keys() == b_inits.keys() and len(a_inits) > 100
    for name, value in a_inits.items():
        assert value.dtype == b_inits[name].dtype and np.array_equal(value, b_inits[name]), name
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert (ours.parent / "model.onnx.data").stat().st_size > ours.stat().st_size


def test_float32_compute_is_the_float32_module_on_the_same_weights(tiny_model: Callable[[str], Path]) -> None:
    source = ModelSource(tiny_model("sd"))
    unet = next(c for c in components(source) if c.spec.name == specs.UNET)
    half = unet.load(torch.float16).eval()
    full = unet.load(torch.float32).eval()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the fp16-rounded weights
    feeds = example_inputs(unet.spec, unet.spec.check_sizes[1], seed=3)
    args = [torch.from_numpy(feeds[t.name]) for t in unet.spec.inputs]
    with torch.no_grad():
        expected = full(*args)
        with float32_compute(half):
            got = half(*args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert {p.dtype for p in half.parameters()} == {torch.float16}  # put back
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in half.modules())
