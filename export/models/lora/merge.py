"""Merging: :func:`plan_merge` (which parameters change, every shape checked), :func:`merged_weight`
(one parameter, in float32, without a delta tensor), :func:`merge_deltas` (a whole state dict).

Ours, not diffusers' ``fuse_lora``: that needs the torch model with PEFT layers injected, where the
service holds only the exported graph and a variant build reads one base tensor at a time (a build costs
about the LoRA's size, not the model's). The merged weights equal ``fuse_lora``'s (the parity tests).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from export.models.lora.layers import COMPONENTS, ONNX_PREFIXES, LoraIncompatible, LoraLayer, LoraWeights

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MergeTerms = list[tuple[LoraLayer, float]]


def plan_merge(
    shapes: Mapping[str, tuple[int, ...]],
    loras: Sequence[tuple[LoraWeights, float]],
    component: str,
) -> dict[str, MergeTerms]:
    """What merging ``loras`` into ``component`` changes: ``{param: [(layer, strength * scale)]}``.

    ``shapes`` maps each of the component's parameter names to its shape (only the touched ones are
    looked up, so a lazy mapping reads nothing else). Every layer is checked against the base, a
    LoRA with strength 0 too, though it adds no term. Raises :class:`LoraIncompatible` when a layer
    names a module the base lacks or its shapes do not fit. Cheap: no tensor is multiplied.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    names = frozenset(k.removesuffix(".weight") for k in shapes if k.endswith(".weight"))
    terms: dict[str, MergeTerms] = {}
    for lora, strength in loras:
        for module, layer in lora.resolve(component, names).items():
            param = f"{module}.weight"
            layer.check(tuple(shapes[param]), f"{component} module '{module}'")
            if strength != 0:
                terms.setdefault(param, []).append((layer, float(strength) * layer.scale))
    return terms


def merged_weight(base: torch.Tensor, terms: MergeTerms, *, overwrite: bool = False) -> torch.Tensor:
    """``base + sum(factor * up @ down)`` computed in float32, returned in ``base``'s dtype.

    Each term is one fused in-place GEMM (``addmm_``) on the weight seen as ``[out, fan_in]``; no
    delta tensor is allocated. ``overwrite``: a float32 ``base`` is the caller's own buffer and is
    merged in place (what a streamed variant build does with the weight it has just read).
    """
    import torch

    if overwrite and base.dtype == torch.float32 and base.is_contiguous():
        weight = base
    else:
        weight = base.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    flat = weight.view(weight.shape[0], -1)
    for layer, factor in terms:
        flat.addmm_(layer.up.flatten(1).float(), layer.down.flatten(1).float(), alpha=factor)
    return weight if weight.dtype == base.dtype else weight.to(base.dtype)


class _Shapes(Mapping[str, tuple[int, ...]]):
    """The shapes of a state dict's tensors, each looked up when asked for."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def merge_deltas(
    base_state: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[LoraWeights, float]],
    component: str,
) -> dict[str, torch.Tensor]:
    """The merged weights of ``component``: ``{param: W + sum_i weight_i * scale_i * (B_i @ A_i)}``.

    ``base_state`` is the component's own state dict (``unet.state_dict()``, the CLIP model's),
    ``loras`` pairs of a LoRA and its strength. Only the parameters some LoRA touches are returned,
    computed in float32 and stored in the base weight's dtype; ``base_state`` is left as it is. See
    :func:`plan_merge` for what is checked.
    """
    terms = plan_merge(_Shapes(base_state), loras, component)
    merged = {param: merged_weight(base_state[param], t) for param, t in terms.items()}
    logger.info(
        "%s: merged %d LoRA(s) into %d parameters", component, sum(1 for _, w in loras if w), len(merged)
    )
    return merged


def check_components(lora: LoraWeights, available: Collection[str]) -> None:
    """Raise :class:`LoraIncompatible` if ``lora`` has layers for a component the model lacks
    (e.g. an SDXL LoRA's ``text_encoder_2`` layers on an SD 1.5 model)."""
    extra = [c for c in lora.components if c not in available]
    if extra:
        raise LoraIncompatible(
            f"'{lora.source}' has layers for {', '.join(extra)}, which the base model does not have"
        )


def load_base_state(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    """The state dict of one component of a diffusers folder, as the exporter loads it.

    Loaded through :func:`export.models.modules.components`, so the parameter names are the ones the
    ONNX initializers carry (after :data:`ONNX_PREFIXES`); text encoders in particular get the
    names of the installed transformers version, whatever the files on disk use.
    """
    from export.models.modules import components
    from export.models.source import ModelSource

    prefix = ONNX_PREFIXES[component]
    for part in components(ModelSource(Path(model_dir))):
        if part.spec.name == component:
            state = part.load().state_dict()
            return {k.removeprefix(prefix): v.detach() for k, v in state.items() if k.startswith(prefix)}
    raise ValueError(f"{model_dir} has no component {component!r}")
