"""The module's source folder in a ``python-torch`` model directory: written at export, read back at load.

:func:`write_torch_model` copies what the module is built from into ``<model>/1/source/``: the
component's diffusers subfolders (config + chosen weights), the small JSON configs of the other
subfolders (the loaders read the model's description from them), and ``torch_module.json`` naming the
component and its CUDA dtype. :func:`load_component` rebuilds the component from that folder with the
very loader the exporter uses (:func:`export.models.modules.components` over the copied folder, or the
safety checker's); :mod:`export.triton_models.torch_model` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from export.contract.specs import SAFETY_CHECKER, SOURCE_DIR, VAE_DECODER, ModelSpec
from export.models.lora import ONNX_PREFIXES
from export.models.modules import Component, components
from export.models.safety import SafetyCheckerSource
from export.models.source import ModelSource, read_json_object
from export.models.weights import WeightChoice

MODULE_FILE: Final = "torch_module.json"
_DTYPES: Final[dict[str, torch.dtype]] = {"float16": torch.float16, "float32": torch.float32}


class TorchModelError(RuntimeError):
    """A python-torch model directory whose module cannot be rebuilt or does not fit its spec."""


def write_torch_model(
    component: Component, version_dir: Path, weights: WeightChoice, *, cuda_dtype: str
) -> None:
    """Copy what ``component`` is built from (its chosen weight files and configs) into
    ``version_dir/source``.

    The component's subfolders are relative to its root: the diffusers model folder, or a safety
    checker's root.  For a pipeline component the JSON configs of every subfolder come too, since the
    loaders read the model's description (UNet sample size, VAE scale...) from them.  Weight files are
    hard-linked where the file system allows, else copied.
    """
    if cuda_dtype not in _DTYPES:
        raise ValueError(f"cuda_dtype must be one of {sorted(_DTYPES)}, got {cuda_dtype!r}")
    root = component.root
    source = version_dir / SOURCE_DIR
    source.mkdir(parents=True)
    info: dict[str, Any] = {"name": component.spec.name, "cuda_dtype": cuda_dtype}
    files = component.source_files(weights)
    if component.spec.name == SAFETY_CHECKER:
        info["loader"] = "safety_checker"
        info["checker"] = component.subfolders[0]
    else:
        info["loader"] = "pipeline"
        files += [p.relative_to(root).as_posix() for p in (*root.glob("*.json"), *root.glob("*/*.json"))]
    for rel in sorted(set(files)):
        target = source / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(str(root / rel), str(target))
    (version_dir / MODULE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def cuda_dtype_for(source: ModelSource, spec: ModelSpec) -> str:
    """fp16, except an SDXL VAE whose config says ``force_upcast`` (its fp16 decode overflows), which
    diffusers' SDXL pipeline runs in fp32."""
    if (
        spec.name == VAE_DECODER
        and source.family.vae_force_upcast
        and source.config("vae").get("force_upcast", True)
    ):
        return "float32"
    return "float16"


@dataclass(frozen=True)
class LoadedComponent:
    component: Component
    module: nn.Module
    cuda_dtype: torch.dtype


def load_component(version_dir: Path, cuda: bool = False) -> LoadedComponent:
    """Rebuild the component written by :func:`write_torch_model`, on CPU in eval mode: in float32, or
    with ``cuda`` in the dtype it runs in on a GPU (loaded so, not cast after a float32 load)."""
    info = read_json_object(version_dir / MODULE_FILE)
    cuda_dtype = _DTYPES[str(info.get("cuda_dtype", "float16"))]
    source = version_dir / SOURCE_DIR
    if info.get("loader") == "safety_checker":
        component = SafetyCheckerSource.find(source / str(info["checker"])).component()
    else:
        matches = [c for c in components(ModelSource(source)) if c.spec.name == info.get("name")]
        if not matches:
            raise TorchModelError(
                f"{version_dir}: the model in {source} has no component {info.get('name')!r}"
            )
        component = matches[0]
    module = component.load(cuda_dtype if cuda else torch.float32).eval().requires_grad_(False)
    return LoadedComponent(component, module, cuda_dtype)


def base_state(model_dir: Path, version: str = "1") -> dict[str, torch.Tensor]:
    """The base weights a LoRA variant of Triton model directory ``model_dir`` merges into, keyed as
    the variant file must key them (the diffusers module's parameter names, as
    :func:`export.models.lora.load_base_state` gives them): the state for
    :func:`export.models.lora.merge_deltas` on this target, where there is no ONNX graph to read it from."""
    loaded = load_component(model_dir / version)
    prefix = ONNX_PREFIXES.get(loaded.component.spec.name)
    if prefix is None:
        raise TorchModelError(f"{model_dir}: model {loaded.component.spec.name} takes no LoRA variants")
    return {
        k.removeprefix(prefix): v.detach()
        for k, v in loaded.module.state_dict().items()
        if k.startswith(prefix)
    }
