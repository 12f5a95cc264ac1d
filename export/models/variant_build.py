"""Build a LoRA variant: LoRA files + an exported model repository -> the variant's override files.

A variant is the base model plus overrides, not a copy of it. For a Triton model ``M`` (``unet``,
``text_encoder``, ``text_encoder_2``) the overrides of variant ``K`` are
``<repository>/M/variants/K.safetensors``: the merged tensors of the layers the LoRAs touch, keyed
by the diffusers module's parameter names (those :func:`export.models.lora.merge_deltas` returns), in the
base model's dtype. The header metadata names the ONNX initializer prefix (``onnx_prefix``) so a
backend maps a parameter to its initializer without the exporter's code.

A build is two calls: :func:`plan_variant` reads the LoRAs and checks them against the base shapes
(nothing merged, so the caller can reserve the bytes first), then :func:`write_variant` streams each
touched tensor: read it alone from the base (:mod:`export.models.onnx_weights`), add its LoRA terms in
place, write it. A build costs about the LoRA's size, not the model's, and holds a few tensors at
a time, not the variant. Pure: no service state; the service, the benchmark and the tests call the
same functions.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from export.contract.specs import VARIANT_KEY, VARIANTS_DIR
from export.models.lora import (
    ONNX_PREFIXES,
    LoraWeights,
    MergeTerms,
    check_components,
    load_lora,
    merged_weight,
    plan_merge,
)
from export.models.onnx_weights import LazyOnnxState, initializer_index
from export.triton_models.torch_source import SOURCE_DIR

if TYPE_CHECKING:
    import torch

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


# The dtypes base weights come in: name -> (safetensors code, bytes per item).
_DTYPES: Final[dict[str, tuple[str, int]]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
}
_NAMES: Final[dict[str, str]] = {code: name for name, (code, _) in _DTYPES.items()}


class BaseState(Protocol):
    """A base model's state dict read on demand: each ``state[param]`` is a new tensor of the
    caller's; ``shapes`` and ``dtypes`` (names: ``float32``, ...) are known without reading any."""

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    @property
    def dtypes(self) -> Mapping[str, str]: ...

    def __getitem__(self, key: str) -> torch.Tensor: ...


class BaseIndex:
    """The base models' weights, read on demand: from the exported ONNX graph (python-onnx, tensorrt:
    where each initializer's bytes are, indexed once per model), or from the diffusers safetensors a
    python-torch model directory holds (its ``source/<model>/`` folder)."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._indexes: dict[str, dict] = {}

    def state(self, model: str) -> BaseState:
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
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()
                for key in names:
                    part = f.get_slice(key)
                    self._where[key] = file
                    self.shapes[key] = tuple(part.get_shape())
                    self.dtypes[key] = _NAMES.get(part.get_dtype(), part.get_dtype())

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass(frozen=True)
class VariantPlan:
    """What a variant changes, before anything is merged: per model, the parameters some LoRA
    touches and their LoRA terms (:func:`export.models.lora.plan_merge`), over the base weights' shapes."""

    loras: tuple[LoraInput, ...]
    states: Mapping[str, BaseState]
    terms: Mapping[str, Mapping[str, MergeTerms]]

    def described(self) -> list[dict[str, object]]:
        """The LoRA set as the variant's files and its cache record name it: each id and weight."""
        return [{"id": s.lora_id, "weight": s.weight} for s in self.loras]

    def nbytes(self, model: str, param: str) -> int:
        state = self.states[model]
        return math.prod(state.shapes[param]) * _DTYPES[state.dtypes[param]][1]

    def tensor_bytes(self) -> int:
        """Bytes of the tensors the variant changes (what its files hold, less their small headers)."""
        return sum(self.nbytes(m, p) for m, terms in self.terms.items() for p in terms)

    def file_bytes_bound(self) -> int:
        """An upper bound of the bytes :func:`write_variant` writes: the tensors plus their headers."""
        header = 4096 + len(json.dumps(self.described()))
        per_tensor = 512  # name, dtype, shape and offsets in the JSON header
        return self.tensor_bytes() + sum(header + per_tensor * len(t) for t in self.terms.values())


def plan_variant(base: BaseIndex, models: Sequence[str], loras: Sequence[LoraInput]) -> VariantPlan:
    """Read the LoRAs and check them against the base models (no tensor is merged yet).

    Raises :class:`export.models.lora.LoraError` when a LoRA does not fit the base."""
    weights: list[tuple[LoraWeights, float]] = [(load_lora(s.file, s.lora_id), s.weight) for s in loras]
    for lora, _ in weights:
        check_components(lora, models)
    states: dict[str, BaseState] = {}
    terms: dict[str, dict[str, MergeTerms]] = {}
    for model in models:
        if not any(lora.layers.get(model) for lora, _ in weights):
            continue
        states[model] = base.state(model)
        planned = plan_merge(states[model].shapes, weights, model)
        if planned:
            terms[model] = planned
    return VariantPlan(tuple(loras), states, terms)


def _layout(plan: VariantPlan, model: str, order: Sequence[str]) -> tuple[bytes, list[int]]:
    """The safetensors header of ``model``'s override file (its tensors back to back in ``order``)
    and where in the file each tensor's bytes start."""
    state = plan.states[model]
    metadata = {"format": FORMAT, "onnx_prefix": ONNX_PREFIXES[model], "loras": json.dumps(plan.described())}
    header: dict[str, object] = {"__metadata__": metadata}
    starts, offset = [], 0
    for param in order:
        starts.append(offset)
        end = offset + plan.nbytes(model, param)
        code = _DTYPES[state.dtypes[param]][0]
        header[param] = {"dtype": code, "shape": list(state.shapes[param]), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return prefix, [len(prefix) + start for start in starts]


def write_variant(repository: Path, key: str, plan: VariantPlan, threads: int = 2) -> dict[str, Path]:
    """Merge each model's overrides into their file, one tensor at a time, ``threads`` at once.

    Each touched base weight is read alone from the base, its LoRA terms are added in place, and its
    bytes are written at their offset in the file (a temporary name, renamed into place when whole).
    Memory holds ``threads`` weights, not the variant. The file is safetensors, the tensors in the
    base's dtype, largest items first (so each is aligned) then by name."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    import torch

    def merge_one(fd: int, model: str, param: str, offset: int) -> None:
        weight = merged_weight(plan.states[model][param], plan.terms[model][param], overwrite=True)
        data = weight.reshape(-1).view(torch.uint8).numpy().data
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)

    written: dict[str, Path] = {}
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="variant-write") as pool:
        for model, terms in plan.terms.items():
            state = plan.states[model]
            order = sorted(terms, key=lambda p: (-_DTYPES[state.dtypes[p]][1], p))
            out = variant_file(repository, model, key)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.partial")
            header, starts = _layout(plan, model, order)
            try:
                with partial.open("wb") as fh:
                    fh.write(header)
                    fh.flush()
                    jobs = [
                        pool.submit(merge_one, fh.fileno(), model, param, start)
                        for param, start in zip(order, starts, strict=True)
                    ]
                    # Every job ends before the file is closed (its descriptor could be reused).
                    done, _ = wait(jobs, return_when=FIRST_EXCEPTION)
                    for job in jobs:
                        job.cancel()
                    wait(jobs)
                    for job in done:
                        job.result()
                partial.rename(out)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            written[model] = out
    return written
