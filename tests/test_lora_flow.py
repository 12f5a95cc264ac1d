"""LoRAs for the SD3 and FLUX transformers, merge side: equal to diffusers' load_lora_weights + fuse_lora.

diffusers / PEFT layout for both transformers, kohya (sd-scripts' BFL names, fused qkv split) for FLUX.
Cost: the two tiny models (shared session fixtures) and a few seconds of merging.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from export.models.lora import LoraIncompatible, load_base_state, load_lora, merge_deltas
from tests.support.lora import diffusers_lora, transformer_pipeline

State = dict[str, torch.Tensor]

# sd-scripts' names; diffusers itself cannot split single blocks' linear1 of a non-12B model.
KOHYA_LAYERS = {
    "double_blocks_0_img_attn_qkv": (96, 32),
    "double_blocks_0_txt_attn_qkv": (96, 32),
    "double_blocks_0_img_attn_proj": (32, 32),
    "double_blocks_0_txt_mlp_2": (32, 128),
    "double_blocks_0_img_mod_lin": (192, 32),
    "single_blocks_1_linear2": (32, 160),
    "single_blocks_0_modulation_lin": (96, 32),
}


def _kohya_flux_lora(path: Path, seed: int, layers: dict[str, tuple[int, int]] = KOHYA_LAYERS) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (out, fan_in) in layers.items():
        tensors[f"lora_unet_{layer}.lora_down.weight"] = torch.randn(4, fan_in, generator=gen) * 0.1
        tensors[f"lora_unet_{layer}.lora_up.weight"] = torch.randn(out, 4, generator=gen) * 0.1
        tensors[f"lora_unet_{layer}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _fused(family: str, model_dir: Path, files: list[Path], weights: list[float]) -> tuple[State, State]:
    pipe = transformer_pipeline(family, model_dir)
    base = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    for i, path in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(files))], adapter_weights=weights)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return base, {k: v.detach() for k, v in pipe.transformer.state_dict().items()}


def _assert_merge_equals(base: State, fused: State, merged: State) -> None:
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed and set(merged) == changed
    for k, value in merged.items():
        torch.testing.assert_close(value, fused[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_layout_merge_equals_fuse_lora(
    family: str, tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    model_dir = tiny_model(family)
    files = [diffusers_lora(tmp_path / f"l{s}" / "lora.safetensors", family, model_dir, s) for s in (1, 2)]
    base, fused = _fused(family, model_dir, files, [0.7, 1.3])
    loras = [(load_lora(f), w) for f, w in zip(files, [0.7, 1.3], strict=True)]
    assert all(lora.components == ("transformer",) for lora, _ in loras)
    _assert_merge_equals(base, fused, merge_deltas(base, loras, "transformer"))
    # The exporter's parameter names (what the ONNX initializers carry) are the pipeline's.
    assert set(load_base_state(model_dir, "transformer")) == set(base)


def test_kohya_flux_merge_equals_fuse_lora(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    model_dir = tiny_model("flux")
    path = _kohya_flux_lora(tmp_path / "kohya.safetensors", seed=3)
    base, fused = _fused("flux", model_dir, [path], [0.8])
    lora = load_lora(path)
    assert lora.format == "kohya" and lora.components == ("transformer",)
    merged = merge_deltas(base, [(lora, 0.8)], "transformer")
    _assert_merge_equals(base, fused, merged)
    assert "transformer_blocks.0.attn.add_k_proj.weight" in merged  # split out of txt_attn_qkv


def test_kohya_flux_single_block_linear1_is_split_into_qkv_and_mlp(
    tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    """linear1 fuses q, k, v and the MLP input (FLUX's 3 x inner + 4 x inner rows)."""
    base = transformer_pipeline("flux", tiny_model("flux")).transformer.state_dict()
    path = _kohya_flux_lora(tmp_path / "k.safetensors", seed=4, layers={"single_blocks_0_linear1": (224, 32)})
    lora = load_lora(path)
    merged = merge_deltas(base, [(lora, 1.0)], "transformer")
    layer = next(iter(lora.layers["transformer"].values()))
    prefix = "single_transformer_blocks.0."
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    assert set(merged) == {f"{prefix}{n}.weight" for n in names}
    up = torch.cat([lora.layers["transformer"][f"{prefix}{n}"].up for n in names])
    delta = torch.cat([merged[f"{prefix}{n}.weight"] - base[f"{prefix}{n}.weight"] for n in names])
    torch.testing.assert_close(delta, layer.scale * up @ layer.down, atol=1e-6, rtol=0)


def test_kohya_flux_layer_without_a_module_is_incompatible(tmp_path: Path) -> None:
    path = _kohya_flux_lora(tmp_path / "k.safetensors", seed=5, layers={"double_blocks_0_img_in": (32, 32)})
    with pytest.raises(LoraIncompatible, match="unsupported FLUX LoRA layer"):
        load_lora(path)
