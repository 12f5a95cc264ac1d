"""LoRA variants of a ``python-torch`` model: in-place parameter overrides, a few kept resident."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from export.contract.specs import VARIANT_KEY

logger = logging.getLogger(__name__)


class VariantError(ValueError):
    """A request names a LoRA variant this model cannot serve: bad key, no file, or a file that does
    not fit the module."""


class VariantWeights:
    """LoRA variants of ``module`` (the diffusers model inside the wrapper) as in-place overrides.

    Variant ``key``'s merged parameters are read from ``directory/<key>.safetensors`` and kept on the
    module's device; at most ``max_resident`` stay resident, least recently used dropped first.
    :meth:`activate` copies a variant's tensors into the parameters (and the base values back when
    switching away), so the parameters keep their storage: compiled modules and captured CUDA graphs
    see the variant's weights without being rebuilt.  The base values of the parameters that resident
    variants touch are kept beside them.
    """

    def __init__(self, module: nn.Module, directory: Path, max_resident: int) -> None:
        self.directory = directory
        self.max_resident = max_resident
        self._params = dict(module.named_parameters())
        self._resident: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._base: dict[str, torch.Tensor] = {}
        self.active = ""

    @property
    def resident(self) -> list[str]:
        """Keys of the resident variants, least recently used first."""
        return list(self._resident)

    @torch.no_grad()
    def activate(self, key: str) -> None:
        """Make the module compute variant ``key`` ("" = base).  Raises :class:`VariantError`."""
        if key == self.active:
            if key:
                self._resident.move_to_end(key)
            return
        overrides = self._load(key) if key else {}
        self._restore_base()
        for name, tensor in overrides.items():
            self._params[name].copy_(tensor)
        self.active = key

    def _restore_base(self) -> None:
        if self.active:
            for name in self._resident[self.active]:
                self._params[name].copy_(self._base[name])
        self.active = ""

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        if not VARIANT_KEY.fullmatch(key):
            raise VariantError(f"bad LoRA variant key {key[:80]!r}: expected 16 to 64 lowercase hex digits")
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            raise VariantError(f"LoRA variant {key} not found: {path} is missing")
        overrides = self._read(path)
        while len(self._resident) >= self.max_resident:
            self._evict(next(iter(self._resident)))
        for name in overrides:
            if name not in self._base:
                self._base[name] = self._params[name].detach().clone()
        self._resident[key] = overrides
        logger.info("LoRA variant %s resident (%d tensors)", key, len(overrides))
        return overrides

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise VariantError(f"cannot read LoRA variant {path.name}: {e}") from e
        overrides = {}
        for name, tensor in tensors.items():
            param = self._params.get(name)
            if param is None:
                raise VariantError(f"LoRA variant {path.name}: the model has no parameter '{name}'")
            if tuple(tensor.shape) != tuple(param.shape):
                raise VariantError(
                    f"LoRA variant {path.name}: '{name}' has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            overrides[name] = tensor.to(device=param.device, dtype=param.dtype)
        return overrides

    def _evict(self, key: str) -> None:
        if key == self.active:
            self._restore_base()
        del self._resident[key]
        still_used = {name for tensors in self._resident.values() for name in tensors}
        for name in [n for n in self._base if n not in still_used]:
            del self._base[name]
        logger.info("LoRA variant %s dropped (least recently used)", key)
