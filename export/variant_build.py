"""Build a LoRA variant: LoRA files + an exported model repository -> the variant's override files.

A variant is the base model plus overrides, not a copy of it. For a Triton model ``M`` (``unet``,
``text_encoder``, ``text_encoder_2``) the overrides of variant ``K`` are
``<repository>/M/variants/K.safetensors``: the merged tensors of the layers the LoRAs touch, keyed
by the diffusers module's parameter names (those :func:`export.lora.merge_deltas` returns), in the
base model's dtype. The header metadata names the ONNX initializer prefix (``onnx_prefix``) so a
backend maps a parameter to its initializer without the exporter's code.

Only the base tensors the LoRAs touch are read (:mod:`export.onnx_weights`), so a build costs about
the LoRA's size, not the model's. Pure: no service state; the service, the benchmark and the tests
call the same functions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from export.lora import ONNX_PREFIXES, LoraWeights, check_components, load_lora, merge_deltas
from export.onnx_weights import LazyOnnxState, initializer_index
from export.torch_model import SOURCE_DIR

if TYPE_CHECKING:
    import torch

VARIANTS_DIR: Final = "variants"
VARIANT_KEY: Final = re.compile(r"^[0-9a-f]{16,64}$")
FORMAT: Final = "t2i-lora-variant/1"


@dataclass(frozen=True)
class LoraInput:
    """One LoRA of a set: its file, the name used in messages, and its strength."""

    file: Path
    lora_id: str
    weight: float


def variant_file(repository: Path, model: str, key: str) -> Path:
    """Where the overrides of variant ``key`` for Triton model ``model`` live."""
    if not VARIANT_KEY.match(key):
        raise ValueError(f"variant key {key!r} is not 16-64 lowercase hex digits")
    return repository / model / VARIANTS_DIR / f"{key}.safetensors"


class BaseIndex:
    """The base models' weights, read on demand: from the exported ONNX graph (python-onnx, tensorrt:
    where each initializer's bytes are, indexed once per model), or from the diffusers safetensors a
    python-torch model directory holds (its ``source/<model>/`` folder)."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._indexes: dict[str, dict] = {}

    def state(self, model: str) -> Mapping[str, torch.Tensor]:
        version = self.repository / model / "1"
        if not (version / "model.onnx").is_file() and (version / SOURCE_DIR / model).is_dir():
            return LazySafetensorsState(sorted((version / SOURCE_DIR / model).glob("*.safetensors")))
        if model not in self._indexes:
            self._indexes[model] = initializer_index(version / "model.onnx")
        return LazyOnnxState(self._indexes[model], ONNX_PREFIXES[model])


class LazySafetensorsState(Mapping[str, "torch.Tensor"]):
    """A diffusers module's state dict over its safetensors files, each tensor read when asked for."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                self._where.update(dict.fromkeys(f.keys(), file))

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def merge_variant(
    base: BaseIndex, models: Sequence[str], loras: Sequence[LoraInput]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{model: {param: merged tensor}}`` for the models some LoRA touches.

    Raises :class:`export.lora.LoraError` when a LoRA does not fit the base."""
    weights: list[tuple[LoraWeights, float]] = [(load_lora(s.file, s.lora_id), s.weight) for s in loras]
    for lora, _ in weights:
        check_components(lora, models)
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for model in models:
        if not any(lora.layers.get(model) for lora, _ in weights):
            continue
        deltas = merge_deltas(base.state(model), weights, model)
        if deltas:
            merged[model] = deltas
    return merged


def tensor_bytes(merged: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """Bytes of the tensors a variant changes (what its files hold, less their small headers)."""
    return sum(t.numel() * t.element_size() for tensors in merged.values() for t in tensors.values())


def file_bytes_bound(merged: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[LoraInput]) -> int:
    """An upper bound of the bytes :func:`write_variant` writes: the tensors plus their headers."""
    header = 4096 + len(json.dumps([{"id": s.lora_id, "weight": s.weight} for s in loras]))
    per_tensor = 512  # name, dtype, shape and offsets in the JSON header
    return tensor_bytes(merged) + sum(header + per_tensor * len(t) for t in merged.values())


def write_variant(
    repository: Path,
    key: str,
    merged: Mapping[str, Mapping[str, torch.Tensor]],
    loras: Sequence[LoraInput],
) -> dict[str, Path]:
    """Write each model's overrides atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    described = json.dumps([{"id": s.lora_id, "weight": s.weight} for s in loras])
    written: dict[str, Path] = {}
    for model, tensors in merged.items():
        out = variant_file(repository, model, key)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        metadata = {"format": FORMAT, "onnx_prefix": ONNX_PREFIXES[model], "loras": described}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        partial.rename(out)
        written[model] = out
    return written


def build_variant(
    repository: Path,
    key: str,
    models: Sequence[str],
    loras: Sequence[LoraInput],
    base: BaseIndex | None = None,
) -> dict[str, Path]:
    """LoRA files + base repository -> ``{model: override file}`` for variant ``key``."""
    merged = merge_variant(base or BaseIndex(repository), models, loras)
    return write_variant(repository, key, merged, loras)
