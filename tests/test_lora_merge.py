"""LoRA variants, export side: loading, merging (against diffusers), merged ONNX graphs, refit maps.

The reference for every merge is diffusers itself: ``load_lora_weights`` + ``set_adapters`` +
``fuse_lora`` on the tiny pipeline, whose fused weights the merge must equal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.fixtures.tiny_lora import build_tiny_lora
from export.models.lora import (
    ONNX_PREFIXES,
    LoraIncompatible,
    LoraNotFound,
    LoraWeights,
    OnnxWeightsError,
    check_components,
    initializer_map,
    load_base_state,
    load_lora,
    merge_deltas,
    onnx_state,
    write_merged_onnx,
)
from export.models.modules import UNetModule, components
from export.models.refit import refit_engine, refit_weights
from export.models.source import ModelSource
from export.toolchain.onnx_export import ATOL, RTOL, example_inputs, export_onnx

State = dict[str, torch.Tensor]
WEIGHTS_TWO = (0.5, 1.2)


@pytest.fixture(scope="module")
def lora_file(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]
) -> Callable[..., Path]:
    """``lora_file(family, fmt, seed, text_encoder=False, sgm=False)``: a tiny LoRA, built once."""
    root = tmp_path_factory.mktemp("loras")
    built: dict[tuple[Any, ...], Path] = {}

    def get(family: str, fmt: str, seed: int, text_encoder: bool = False, sgm: bool = False) -> Path:
        key = (family, fmt, seed, text_encoder, sgm)
        if key not in built:
            name = "-".join(str(k) for k in key)
            built[key] = build_tiny_lora(
                family,  # type: ignore[arg-type]
                root / name / "lora.safetensors",
                fmt,  # type: ignore[arg-type]
                seed,
                model_dir=tiny_model(family),
                text_encoder=text_encoder,
                sgm_names=sgm,
            )
        return built[key]

    return get


def _pipeline(family: str, model_dir: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd":
        return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    return StableDiffusionXLPipeline.from_pretrained(model_dir)


def _components(family: str) -> tuple[str, ...]:
    return ("unet", "text_encoder") if family == "sd" else ("unet", "text_encoder", "text_encoder_2")


def diffusers_fused(
    family: str, model_dir: Path, loras: list[tuple[Path, float]]
) -> tuple[dict[str, State], dict[str, State], Any]:
    """(base states, fused states, pipeline) after diffusers' load_lora_weights + set_adapters + fuse_lora."""
    pipe = _pipeline(family, model_dir)
    names = _components(family)
    base = {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in names}
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(components=list(names))
    pipe.unload_lora_weights()  # drops the LoRA layers, keeps the fused weights
    fused = {c: {k: v.detach() for k, v in getattr(pipe, c).state_dict().items()} for c in names}
    return base, fused, pipe


def assert_merge_equals(base: State, fused: State, merged: State, what: str) -> None:
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed, f"{what}: diffusers changed nothing; the LoRA did not apply"
    assert set(merged) == changed, (
        f"{what}: merged {len(merged)} parameters, diffusers changed {len(changed)}"
    )
    for k, value in merged.items():
        torch.testing.assert_close(value, fused[k], atol=1e-5, rtol=0, msg=f"{what}: {k}")


# -------------------------------------------------------------------------------------------
# Merging equals diffusers' fused weights


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("weights", [(1.0,), WEIGHTS_TWO], ids=["one", "two"])
def test_unet_merge_equals_diffusers(
    family: str,
    fmt: str,
    weights: tuple[float, ...],
    tiny_model: Callable[[str], Path],
    lora_file: Callable[..., Path],
) -> None:
    files = [lora_file(family, fmt, seed) for seed in range(1, len(weights) + 1)]
    base, fused, _ = diffusers_fused(family, tiny_model(family), list(zip(files, weights, strict=True)))
    loras = [(load_lora(f), w) for f, w in zip(files, weights, strict=True)]
    assert all(lora.format == fmt for lora, _ in loras)
    merged = merge_deltas(base["unet"], loras, "unet")
    assert_merge_equals(base["unet"], fused["unet"], merged, f"{family}/{fmt}/unet")
    if fmt == "kohya":
        # The kohya file covers convs (3x3 and 1x1) and linears besides attention.
        assert any(v.ndim == 4 and v.shape[-1] == 3 for v in merged.values())
        assert any(v.ndim == 4 and v.shape[-1] == 1 for v in merged.values())


@pytest.mark.parametrize(("family", "fmt"), [("sd", "diffusers"), ("sdxl", "kohya")])
def test_text_encoder_merge_equals_diffusers(
    family: str, fmt: str, tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    """sd: a PEFT-format CLIPTextModel LoRA; sdxl: kohya lora_te1_/lora_te2_ layers, the second
    encoder a CLIPTextModelWithProjection whose names keep transformers 4's ``text_model.``."""
    files = [lora_file(family, fmt, seed, text_encoder=True) for seed in (3, 4)]
    base, fused, _ = diffusers_fused(family, tiny_model(family), list(zip(files, WEIGHTS_TWO, strict=True)))
    loras = [(load_lora(f), w) for f, w in zip(files, WEIGHTS_TWO, strict=True)]
    for component in _components(family):
        assert component in loras[0][0].components
        merged = merge_deltas(base[component], loras, component)
        assert_merge_equals(base[component], fused[component], merged, f"{family}/{fmt}/{component}")


def test_kohya_sgm_block_names_equal_diffusers(
    tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    """kohya's SDXL trainer names UNet layers in the SGM layout (input_blocks_4_1_...)."""
    file = lora_file("sdxl", "kohya", 5, sgm=True)
    assert any("input_blocks" in k for k in load_file(str(file)))
    base, fused, _ = diffusers_fused("sdxl", tiny_model("sdxl"), [(file, 0.7)])
    merged = merge_deltas(base["unet"], [(load_lora(file), 0.7)], "unet")
    assert_merge_equals(base["unet"], fused["unet"], merged, "sdxl/kohya-sgm/unet")
    # Same layers as the diffusers-layout file of the same seed.
    plain = merge_deltas(base["unet"], [(load_lora(lora_file("sdxl", "kohya", 5)), 0.7)], "unet")
    assert set(plain) == set(merged)


def test_kohya_alpha_is_per_layer(tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]) -> None:
    """scale = alpha / rank for each layer (diffusers 0.42 applies the most common alpha to attention
    layers of kohya files whose alphas differ, so this case is checked against the formula)."""
    tensors = load_file(str(lora_file("sd", "kohya", 1)))
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{key}.alpha"] = torch.tensor(7.0)
    path = lora_file("sd", "kohya", 1).parent / "alpha.safetensors"
    save_file(tensors, str(path))
    base = _unet_state(tiny_model("sd"))
    merged = merge_deltas(base, [(load_lora(path), 0.5)], "unet")
    param = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    expected = base[param] + 0.5 * (7.0 / down.shape[0]) * (up @ down)
    torch.testing.assert_close(merged[param], expected, atol=1e-6, rtol=0)


def test_older_diffusers_layouts_and_zero_weight(
    tmp_path: Path, tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    """``.lora.down/up.weight`` keys, unprefixed keys (UNet) and ``.alpha`` tensors give the merge of the
    PEFT file they were converted from; strength 0 changes nothing."""
    file = lora_file("sd", "diffusers", 1)
    tensors = load_file(str(file))
    old: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        old[key.removeprefix("unet.").replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")] = (
            value
        )
        old[f"{module}.alpha"] = torch.tensor(8.0)  # the PEFT file's lora_alpha, rank 4: scale 2
    save_file(old, str(tmp_path / "old.safetensors"))
    base = _unet_state(tiny_model("sd"))
    expected = merge_deltas(base, [(load_lora(file), 0.8)], "unet")
    got = merge_deltas(base, [(load_lora(tmp_path / "old.safetensors"), 0.8)], "unet")
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0)
    assert merge_deltas(base, [(load_lora(file), 0.0)], "unet") == {}


def _unet_state(model_dir: Path) -> State:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    return {k: v.detach() for k, v in unet.state_dict().items()}


# -------------------------------------------------------------------------------------------
# Merged ONNX graphs


@pytest.fixture(scope="module")
def sd_unet_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    component = next(c for c in components(ModelSource(tiny_model("sd"))) if c.spec.name == "unet")
    path = tmp_path_factory.mktemp("onnx") / "unet" / "model.onnx"
    export_onnx(component.load().eval(), component.spec, component.trace_sizes, path)
    return path


def _onnx_vs_torch(onnx_path: Path, unet: Any, spec: Any) -> tuple[float, float]:
    sizes = {"batch": 2, "height": 9, "width": 12}
    feeds = example_inputs(spec, sizes, seed=7)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["noise_pred"], feeds)
    with torch.no_grad():
        expected = UNetModule(unet, text_time=False)(
            *(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
        ).numpy()
    return float(np.abs(got - expected).max()), ATOL + RTOL * float(np.abs(expected).max())


def test_merged_onnx_equals_fused_torch_unet(
    tmp_path: Path,
    sd_unet_onnx: Path,
    tiny_model: Callable[[str], Path],
    lora_file: Callable[..., Path],
) -> None:
    files = [lora_file("sd", "kohya", 1), lora_file("sd", "diffusers", 2)]
    base, _, pipe = diffusers_fused("sd", tiny_model("sd"), list(zip(files, WEIGHTS_TWO, strict=True)))
    deltas = merge_deltas(
        base["unet"], [(load_lora(f), w) for f, w in zip(files, WEIGHTS_TWO, strict=True)], "unet"
    )

    names = initializer_map(sd_unet_onnx, ONNX_PREFIXES["unet"])
    assert set(names) == set(base["unet"])  # every parameter has its own, named initializer
    # The graph's own copy of the weights is a base state as good as the torch model's.
    stored = onnx_state(sd_unet_onnx, ONNX_PREFIXES["unet"])
    assert all(torch.equal(stored[k], v) for k, v in base["unet"].items())
    out = write_merged_onnx(sd_unet_onnx, deltas, tmp_path / "variant" / "model.onnx", ONNX_PREFIXES["unet"])

    spec = next(c.spec for c in components(ModelSource(tiny_model("sd"))) if c.spec.name == "unet")
    error, allowed = _onnx_vs_torch(out, pipe.unet.eval(), spec)
    assert error <= allowed, f"merged ONNX vs diffusers' fused UNet: {error:.3g} > {allowed:.3g}"

    # Only the merged initializers changed; the graph itself is the base graph.
    old, new = onnx.load(str(sd_unet_onnx)), onnx.load(str(out))
    assert old.graph.node == new.graph.node
    old_inits = {i.name: i for i in old.graph.initializer}
    changed = {i.name for i in new.graph.initializer if i != old_inits[i.name]}
    assert changed == {names[p] for p in deltas}


def test_merged_onnx_with_external_data(
    tmp_path: Path, sd_unet_onnx: Path, tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    """A base stored with external data (as models over 2 GB are) gives a variant stored the same way."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    model = onnx.load(str(sd_unet_onnx))
    onnx.save(
        model,
        str(base_dir / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    file = lora_file("sd", "diffusers", 1)
    base, _, pipe = diffusers_fused("sd", tiny_model("sd"), [(file, 1.0)])
    deltas = merge_deltas(base["unet"], [(load_lora(file), 1.0)], "unet")
    out = tmp_path / "variant" / "model.onnx"
    (out.parent).mkdir()
    (out.parent / "model.onnx.data").write_bytes(b"stale")  # must be replaced, not appended to
    write_merged_onnx(base_dir / "model.onnx", deltas, out, ONNX_PREFIXES["unet"])
    assert (out.parent / "model.onnx.data").stat().st_size > out.stat().st_size
    spec = next(c.spec for c in components(ModelSource(tiny_model("sd"))) if c.spec.name == "unet")
    error, allowed = _onnx_vs_torch(out, pipe.unet.eval(), spec)
    assert error <= allowed


def test_merged_text_encoder_onnx_equals_fused_encoder(
    tmp_path: Path, tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    """SDXL's second encoder (CLIPTextModelWithProjection, ``text_model.`` names) from a kohya lora_te2_
    LoRA; the base state comes from load_base_state, i.e. from the exporter's own loader."""
    from export.models.modules import TextEncoderModule

    model_dir = tiny_model("sdxl")
    component = next(c for c in components(ModelSource(model_dir)) if c.spec.name == "text_encoder_2")
    base_onnx = tmp_path / "base" / "model.onnx"
    export_onnx(component.load().eval(), component.spec, component.trace_sizes, base_onnx)
    base_state = load_base_state(model_dir, "text_encoder_2")
    prefix = ONNX_PREFIXES["text_encoder_2"]
    assert set(initializer_map(base_onnx, prefix)) == set(base_state)

    file = lora_file("sdxl", "kohya", 3, text_encoder=True)
    _, _, pipe = diffusers_fused("sdxl", model_dir, [(file, 1.2)])
    deltas = merge_deltas(base_state, [(load_lora(file), 1.2)], "text_encoder_2")
    assert deltas and all(k.startswith("text_model.encoder.layers.") for k in deltas)
    out = write_merged_onnx(base_onnx, deltas, tmp_path / "variant" / "model.onnx", prefix)

    feeds = example_inputs(component.spec, {"batch": 2}, seed=5)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run([t.name for t in component.spec.outputs], feeds)
    with torch.no_grad():
        expected = TextEncoderModule(pipe.text_encoder_2.eval())(torch.from_numpy(feeds["input_ids"]))
    for name, onnx_out, ref in zip((t.name for t in component.spec.outputs), got, expected, strict=True):
        allowed = ATOL + RTOL * float(ref.abs().max())
        assert float(np.abs(onnx_out - ref.numpy()).max()) <= allowed, name


def test_write_merged_onnx_refuses_a_parameter_without_initializer(
    tmp_path: Path, sd_unet_onnx: Path
) -> None:
    with pytest.raises(OnnxWeightsError, match="no initializer"):
        write_merged_onnx(sd_unet_onnx, {"not.a.param.weight": torch.zeros(2)}, tmp_path / "m.onnx", "unet.")
    assert not (tmp_path / "m.onnx").exists()
    name = "conv_in.weight"
    with pytest.raises(OnnxWeightsError, match="shape"):
        write_merged_onnx(sd_unet_onnx, {name: torch.zeros(3)}, tmp_path / "m.onnx", "unet.")


# -------------------------------------------------------------------------------------------
# Errors


INCOMPATIBLE = "LoRa incompatible with base model: "


def test_sdxl_lora_on_sd_model_is_incompatible(
    tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    base = _unet_state(tiny_model("sd"))
    for fmt in ("diffusers", "kohya"):
        lora = load_lora(lora_file("sdxl", fmt, 1))
        with pytest.raises(LoraIncompatible) as info:
            merge_deltas(base, [(lora, 1.0)], "unet")
        assert str(info.value).startswith(INCOMPATIBLE)
        assert "module" in str(info.value)
    with pytest.raises(LoraIncompatible, match="text_encoder_2"):
        check_components(load_lora(lora_file("sdxl", "kohya", 1, text_encoder=True)), _components("sd"))


def test_wrong_shapes_are_incompatible(
    tmp_path: Path, tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    base = _unet_state(tiny_model("sd"))
    tensors = load_file(str(lora_file("sd", "diffusers", 1)))
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight"
    tensors[key] = torch.randn(64, 3)  # rank 3 against lora_A's rank 4
    header = {"format": "pt"}
    save_file(tensors, str(tmp_path / "bad_rank.safetensors"), metadata=header)
    with pytest.raises(LoraIncompatible) as info:
        merge_deltas(base, [(load_lora(tmp_path / "bad_rank.safetensors"), 1.0)], "unet")
    message = str(info.value)
    assert message.startswith(INCOMPATIBLE)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k" in message
    assert "[64, 64]" in message and "[64, 3]" in message and "[4, 64]" in message


def test_missing_lora_is_not_found(tmp_path: Path, lora_file: Callable[..., Path]) -> None:
    with pytest.raises(LoraNotFound) as info:
        load_lora(tmp_path / "nope.safetensors", lora_id="someone/missing-lora")
    assert str(info.value) == "LoRa repository 'someone/missing-lora' not found"
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraNotFound, match="not found"):
        load_lora(tmp_path / "empty")
    # A folder with exactly one .safetensors file, or diffusers' own file name, loads.
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(lora_file("sd", "kohya", 1), folder / "my_style.safetensors")
    assert load_lora(folder).format == "kohya"


def test_unsupported_layers_are_incompatible(tmp_path: Path) -> None:
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraIncompatible, match="unsupported"):
        load_lora(tmp_path / "loha.safetensors")
    save_file({"unet.a.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraIncompatible, match="no up"):
        load_lora(tmp_path / "half.safetensors")
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}
    pair = {"unet.a.lora_A.weight": torch.zeros(4, 8), "unet.a.lora_B.weight": torch.zeros(8, 4)}
    save_file(pair, str(tmp_path / "rank.safetensors"), metadata=meta)
    with pytest.raises(LoraIncompatible, match="r=8"):
        load_lora(tmp_path / "rank.safetensors")


def test_metadata_alpha_and_patterns(tmp_path: Path) -> None:
    """PEFT scale from diffusers' lora_adapter_metadata: lora_alpha / r, alpha_pattern, rsLoRA."""
    pair = {
        "unet.blocks.0.to_q.lora_A.weight": torch.zeros(4, 8),
        "unet.blocks.0.to_q.lora_B.weight": torch.zeros(8, 4),
        "unet.blocks.0.to_k.lora_A.weight": torch.zeros(4, 8),
        "unet.blocks.0.to_k.lora_B.weight": torch.zeros(8, 4),
    }
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 2}}
    save_file(pair, str(tmp_path / "a.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    layers = load_lora(tmp_path / "a.safetensors").layers["unet"]
    assert layers["blocks.0.to_q"].scale == 2.0 and layers["blocks.0.to_k"].scale == 0.5
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True}
    save_file(pair, str(tmp_path / "b.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert load_lora(tmp_path / "b.safetensors").layers["unet"]["blocks.0.to_q"].scale == 4.0
    save_file(pair, str(tmp_path / "c.safetensors"))  # no metadata, no alphas: diffusers uses scale 1
    assert load_lora(tmp_path / "c.safetensors").layers["unet"]["blocks.0.to_q"].scale == 1.0


# -------------------------------------------------------------------------------------------
# TensorRT refit


def test_refit_weight_map_covers_the_union_and_restores_base(
    tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    base = _unet_state(tiny_model("sd"))
    x = merge_deltas(base, [(load_lora(lora_file("sd", "kohya", 1)), 1.0)], "unet")  # convs + attention
    y = merge_deltas(base, [(load_lora(lora_file("sd", "diffusers", 2)), 0.5)], "unet")  # attention only
    only_x = set(x) - set(y)
    assert only_x and set(y) < set(x)

    weights = refit_weights(base, x, y)
    assert set(weights) == {f"unet.{p}" for p in set(x) | set(y)}
    for p in y:
        np.testing.assert_array_equal(weights[f"unet.{p}"], y[p].numpy())
    for p in only_x:  # X's weights that Y does not touch go back to the base model
        np.testing.assert_array_equal(weights[f"unet.{p}"], base[p].numpy())
    assert all(w.flags.c_contiguous and w.dtype == np.float32 for w in weights.values())
    # Back to the base model: X's weights, all at base; from the base: just Y's.
    assert {k: v.tobytes() for k, v in refit_weights(base, x, {}).items()} == {
        f"unet.{p}": base[p].numpy().tobytes() for p in x
    }
    assert set(refit_weights(base, {}, y)) == {f"unet.{p}" for p in y}


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture
def cuda_stream() -> Iterator[Any]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    yield torch.cuda.current_stream()


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not _tensorrt_importable(), reason="TensorRT is not installable here; runs where TensorRT exists"
)
def test_refit_engine_to_a_variant_and_back(
    tmp_path: Path,
    cuda_stream: Any,
    sd_unet_onnx: Path,
    tiny_model: Callable[[str], Path],
    lora_file: Callable[..., Path],
) -> None:
    import tensorrt as trt

    spec = next(c.spec for c in components(ModelSource(tiny_model("sd"))) if c.spec.name == "unet")
    sizes = {"batch": 2, "height": 8, "width": 8}
    feeds = example_inputs(spec, sizes, seed=3)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(sd_unet_onnx)), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for t in spec.inputs:
        shape = t.concrete(sizes)
        profile.set_shape(t.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine_path = tmp_path / "base.plan"
    engine_path.write_bytes(memoryview(plan))

    base = _unet_state(tiny_model("sd"))
    all_base = {f"unet.{k}": v.numpy() for k, v in base.items()}
    deltas = merge_deltas(base, [(load_lora(lora_file("sd", "kohya", 1)), 0.8)], "unet")
    variant = refit_engine(
        engine_path, tmp_path / "variant.plan", refit_weights(base, {}, deltas), base_weights=all_base
    )
    back = refit_engine(
        variant, tmp_path / "back.plan", refit_weights(base, deltas, {}), base_weights=all_base
    )

    def run(plan: Path) -> np.ndarray:
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        context = engine.create_execution_context()
        tensors = {n: torch.from_numpy(v).cuda() for n, v in feeds.items()}
        tensors["noise_pred"] = torch.empty(spec.output("noise_pred").concrete(sizes), device="cuda")
        for name, tensor in tensors.items():
            if name in feeds:
                context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        assert context.execute_async_v3(cuda_stream.cuda_stream)
        cuda_stream.synchronize()
        return tensors["noise_pred"].cpu().numpy()

    merged_onnx = write_merged_onnx(sd_unet_onnx, deltas, tmp_path / "variant.onnx", "unet.")
    for plan, onnx_path in ((variant, merged_onnx), (back, sd_unet_onnx)):
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        (expected,) = session.run(["noise_pred"], feeds)
        np.testing.assert_allclose(run(plan), expected, atol=1e-3 + 1e-2 * float(np.abs(expected).max()))


def test_tiny_loras_are_deterministic(
    tmp_path: Path, tiny_model: Callable[[str], Path], lora_file: Callable[..., Path]
) -> None:
    """Same seed, same tensors and header (not always the same bytes: safetensors writes the header's
    metadata map in hash order)."""
    from safetensors import safe_open

    lora: LoraWeights = load_lora(lora_file("sdxl", "diffusers", 1, text_encoder=True))
    assert lora.components == ("unet", "text_encoder", "text_encoder_2")
    for fmt in ("diffusers", "kohya"):
        first = lora_file("sdxl", fmt, 1, text_encoder=True)
        again = build_tiny_lora(
            "sdxl",
            tmp_path / fmt / "lora.safetensors",
            fmt,  # type: ignore[arg-type]
            1,
            model_dir=tiny_model("sdxl"),
            text_encoder=True,
        )
        with safe_open(str(first), "pt") as a, safe_open(str(again), "pt") as b:
            assert a.metadata() == b.metadata()
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
